"""Training data: a sharded, resumable, reshardable Parquet token source.

- `prepare.py`: `orchestrator data prepare` writes a corpus (shards, then dataset.json);
- `manifest.py`: dataset.json, read as untrusted input;
- `dataset.py`: opening and checking a dataset, reading row groups with retries;
- `order.py`: the global sample order (a seeded permutation per epoch), pure functions;
- `source.py`: a rank's prefetched batch stream, saved and restored with the checkpoint.
"""

from orchestrator.data.dataset import TokenDataset
from orchestrator.data.source import Batch, TokenSource

__all__ = ["Batch", "TokenDataset", "TokenSource"]
