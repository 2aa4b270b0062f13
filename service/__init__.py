"""The shared service layer of slimline: settings, database, ORM, JobSpec, job states, object
store, queue client, auth and domain errors. Never imports torch or core at module level."""
