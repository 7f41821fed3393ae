"""The fold: checked events and probe readings into bounded state.

pipeline.py is the one entry (one lock) and fans updates out to the sinks; state.py is one
handler table over the domain folds (tasks.py, workers.py, queues.py, beat.py), each with its
stated bounds.
"""
