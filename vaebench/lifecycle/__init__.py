"""The life of a tracked run: claimed exactly once (claims.py, exactly_once.py), checked
before anything is tracked (preflight.py), started or continued, trained with a checkpoint
every epoch, finished, FAILED or KILLED (execute.py, execute_stack.py), finished here or in
a background process (post_run.py, artifacts.py); provenance.py says what its numbers
depend on beyond the config.
"""
