"""The life of tracked runs, one alone or K as a stack (execute.py): claimed exactly once
(claims.py, exactly_once.py), checked before anything is tracked (preflight.py), started or
continued (resume.py), trained with a checkpoint every epoch, finished, FAILED or KILLED;
finished here or in a background process (post_run.py, artifacts.py). workspace.py holds what
the runs of one process share; provenance.py what their numbers depend on beyond the config.
"""
