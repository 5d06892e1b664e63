"""What a GGUF file holds, measured from the file: size, file type, tensor types, bits per weight.

The nominal bits of a type (Q4_0: 4.5) describe its main matrices only; a real file mixes types
(``output.weight`` is Q6_K in a Q4_0 file, norms are F32, rows that are not whole blocks fall back), so the
Quantize report and the CLI print these measured figures instead.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from modules.quantize.errors import GGUFExportError
from modules.quantize.gguf_types import type_name_for_ftype


@dataclass(frozen=True)
class GGUFFileInfo:
    path: Path
    file_bytes: int
    #: ``general.file_type`` as a GGUF_TYPES name (None when absent or unknown)
    file_type: str | None
    architecture: str | None
    #: weights (elements) over all tensors, and the bytes they take
    weights: int
    tensor_bytes: int
    #: the same over 2-D tensors only (the matrices a type quantizes)
    matrix_weights: int
    matrix_bytes: int
    #: ggml type name -> number of tensors of that type
    tensor_types: dict[str, int]

    @property
    def bits_per_weight(self) -> float:
        """Tensor bits per weight over the whole file (norms included)."""
        return 8 * self.tensor_bytes / max(self.weights, 1)

    @property
    def matrix_bits_per_weight(self) -> float:
        """Bits per weight of the 2-D tensors: what the type's nominal figure describes."""
        return 8 * self.matrix_bytes / max(self.matrix_weights, 1)


def gguf_file_info(path: str | Path) -> GGUFFileInfo:
    """Read the header of the GGUF at *path* (no tensor data is read)."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise GGUFExportError(f"{path} is not a readable GGUF file: {exc}") from exc

    def scalar(key: str):
        found = reader.fields.get(key)
        return None if found is None else found.contents()

    ftype = scalar("general.file_type")
    weights = tensor_bytes = matrix_weights = matrix_bytes = 0
    types: Counter[str] = Counter()
    for tensor in reader.tensors:
        weights += int(tensor.n_elements)
        tensor_bytes += int(tensor.n_bytes)
        types[tensor.tensor_type.name] += 1
        if len(tensor.shape) == 2:
            matrix_weights += int(tensor.n_elements)
            matrix_bytes += int(tensor.n_bytes)
    return GGUFFileInfo(path=path, file_bytes=path.stat().st_size,
                        file_type=type_name_for_ftype(int(ftype)) if ftype is not None else None,
                        architecture=scalar("general.architecture"), weights=weights, tensor_bytes=tensor_bytes,
                        matrix_weights=matrix_weights, matrix_bytes=matrix_bytes, tensor_types=dict(types))
