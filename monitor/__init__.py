"""The watcher: the Celery event stream and the broker, folded into bounded state.

One folder per stage of the data path, and imports run the same way
(tests/test_architecture.py):

- intake/: the event paths (Redis and RabbitMQ fast paths, celery's EventReceiver) and
  the broker and worker probes;
- boundary/: every event checked once, before anything changes;
- fold/: the pipeline and the bounded state it folds into;
- the read API on top: view.py (snapshots), sinks.py (updates), advice.py (what the
  stream lacks, told to the operator), and signals.py, the threshold signal table;
- config/: the typed config, hot reload and what the Celery app says: a leaf.
"""
