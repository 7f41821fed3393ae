"""What comes in: the event stream and the broker probes.

broker_url.py checks and redacts the broker URL; consumer.py picks one event path for it and
reconnects forever, saying once, in plain words, why a connection fails; each path hands
bodies or event dicts to the boundary and the fold, and a bad message is its own problem:
only socket and protocol errors cost a reconnect. probes.py reads queue lengths and asks the
workers (inspect), off the event path.
"""
