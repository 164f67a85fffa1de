"""Storing a computed adapter (GenKnowSub residual, merge, cluster expert) as an ordinary expert's
two files: written to a ``.derive-*`` folder in the library, validated by the reader ``libstore add``
uses, then put into the blob store.

The folder is a temp file of the library: ``gc`` removes it once it is older than the grace period,
and ``gc --grace 0`` ("nobody else writes") at once. If it vanishes while the adapter is written or
read, the operation fails with :class:`BlobsRemovedError` (run it again), never with the raw
``FileNotFoundError`` of a missing temp file, and nothing is recorded.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from libstore.errors import BlobsRemovedError, ValidationError
from libstore.store.adapter import read_adapter
from libstore.store.backend import BlobBackend
from libstore.store.safetensors_io import save_tensors
from libstore.types import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterFile, StoredFile

if TYPE_CHECKING:
    import torch

#: The folder a derived expert's files are written to (in the library folder) first.
TEMP_PREFIX = ".derive-"


def store_derived(
    blobs: BlobBackend,
    library: Path,
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
) -> tuple[AdapterFile, tuple[StoredFile, StoredFile]]:
    """Write ``config`` and ``tensors`` as a PEFT folder, validate it and store its two files;
    returns the validated adapter and the stored files (config, weights)."""
    with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX, dir=library) as tmp:
        folder = Path(tmp)
        try:
            (folder / ADAPTER_CONFIG).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
            save_tensors(dict(tensors), folder / ADAPTER_WEIGHTS, metadata=dict(metadata))
            adapter = read_adapter(folder, into=blobs)
        except (FileNotFoundError, ValidationError):
            if folder.is_dir():
                raise  # the adapter itself is wrong (or something else is missing), not the folder
            raise BlobsRemovedError(
                f"the staging folder {folder} of the derived expert was removed while it was written "
                f"(a gc with --grace 0 ran meanwhile). Nothing was stored; run the operation again"
            ) from None
        with blobs.discarding([adapter.weights]):
            cfg_ref = blobs.put_bytes(adapter.config_bytes)
            w_ref = blobs.commit_staged(adapter.weights)
    return adapter, (
        StoredFile(ADAPTER_CONFIG, cfg_ref.sha256, cfg_ref.size),
        StoredFile(ADAPTER_WEIGHTS, w_ref.sha256, w_ref.size),
    )
