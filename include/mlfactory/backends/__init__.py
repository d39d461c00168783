"""The built-in backends, one package each: ``local``, ``aws``, ``gcp``, ``azure``.

Each holds its settings model (its section of the pipeline config), its pure translation of the
cloud-neutral specs (``mlfactory.specs``) into its own requests, and its containers' conventions
(``runtime``). They are registered, and found, through ``mlfactory.backend_registry``; nothing in the
core imports this package.
"""
