"""The data stage (ml_ingest, ml_validate, ``mlfactory init``): landed objects to immutable raw snapshots
(``landing``, ``ingest``), raw snapshots to curated Parquet under the data contract (``etl``, ``validation``),
a config inferred from the user's files (``schema_inference``) and the demo table (``sample_data``)."""
