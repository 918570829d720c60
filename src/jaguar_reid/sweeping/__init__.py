"""A sweep's parts (`jaguar_reid.sweep` is the command): `plan` reads a command line into
named, checked runs; `table` pairs finished runs against a baseline and writes the table."""
