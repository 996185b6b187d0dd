"""Core pieces shared by the producer, the worker and the model: settings, errors, job storage."""
