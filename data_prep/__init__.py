"""Data preparation: manifests → WebDataset shards (``shard.py``), the bundled dataset
(``builtin.py``) and converters from public formats (``from_*.py``)."""
