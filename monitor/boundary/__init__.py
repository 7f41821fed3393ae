"""Every event checked once, at the fold's entry, before anything changes.

parse.py is the rule, field by field, with the reason for every refusal; hot.py decodes and
checks the hot task events in one msgspec step, never more leniently; clock.py is
EventReceiver's Lamport clock arithmetic. Imports nothing else of the package.
"""
