"""Integrations with other frameworks, each imported only when used
(``modelpool.integrations.celery``,
``modelpool.integrations.torch``)."""
