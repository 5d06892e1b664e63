"""The GGUF file types Atelier writes: one table for the CLI, the Quantize tab and the report.

A file type (llama.cpp's ``llama_ftype``, stored as ``general.file_type``) names the type of the big
matrices; llama.cpp's quantizer then picks per tensor (the ``_S``/``_M``/``_L`` mixes give ``attn_v``,
``ffn_down`` and ``output`` more bits; ``output.weight`` of Q4_0 is Q6_K; 1-D norms always stay F32), and
falls back per tensor when a row is not a whole number of blocks (a 64-wide row cannot be Q4_K, whose
blocks hold 256 values: it becomes Q5_0, or F16 if not even 32 divides it).

``nominal_bits`` is the bits per weight of the main tensor type (``gguf.GGML_QUANT_SIZES``: Q4_0 stores 32
weights in 18 bytes = 4.5 bits); a real file's figure differs by its mix and its F32 norms and is
measured from the file (:func:`modules.quantize.gguf_export.file_bits_per_weight`).

``needs_imatrix``: llama.cpp refuses these without an importance matrix (``llama-quant.cpp``
``tensor_requires_imatrix``: IQ1_*, IQ2_XXS/XS/S and IQ3_XXS tensors, and the Q2_K tensors of a Q2_K_S
file; IQ3_XS is a mix with IQ3_XXS tensors): their 1.5-3 bit codebooks are fitted to the activations, and
without them the model breaks. The test exporting every type checks this list against llama.cpp.

The ``ftype`` numbers are llama.h's ``enum llama_ftype`` (a stable file-format ABI); the tests check them
against ``llama_cpp``'s constants, so this module imports without llama_cpp.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GGUFType:
    name: str
    #: llama.h ``LLAMA_FTYPE_*`` value, also the file's ``general.file_type``
    ftype: int
    #: ggml type of the big matrices (llama.cpp's ``llama_ftype_get_default_type``)
    main_type: str
    needs_imatrix: bool = False
    #: what it is for, one line (CLI help, the tab's tooltip)
    note: str = ""

    @property
    def nominal_bits(self) -> float:
        """Bits per weight of the main tensor type."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[self.main_type]]
        return nbytes * 8 / block

    @property
    def written_by_llama_cpp(self) -> bool:
        """True when llama.cpp's quantizer makes it (from an F16/F32 file); F32/F16/BF16 are written directly."""
        return self.name not in UNQUANTIZED


#: Types written with the ``gguf`` package alone (llama.cpp's ``convert_hf_to_gguf.py --outtype``).
UNQUANTIZED = ("F32", "F16", "BF16")

_TABLE = [
    GGUFType("F32", 0, "F32", note="full precision; the reference for every other type"),
    GGUFType("F16", 1, "F16", note="half precision, no measurable loss"),
    GGUFType("BF16", 32, "BF16", note="bfloat16: the range of F32 with the size of F16"),
    GGUFType("Q8_0", 7, "Q8_0", note="8-bit, nearly lossless (+0.003 ppl on Llama-3-8B)"),
    GGUFType("Q6_K", 18, "Q6_K", note="6-bit k-quant (+0.02 ppl on Llama-3-8B)"),
    GGUFType("Q5_K_M", 17, "Q5_K", note="5-bit k-quant mix (+0.06 ppl on Llama-3-8B)"),
    GGUFType("Q5_K_S", 16, "Q5_K", note="5-bit k-quant, fewer upgraded tensors"),
    GGUFType("Q5_1", 9, "Q5_1", note="5-bit legacy with offsets"),
    GGUFType("Q5_0", 8, "Q5_0", note="5-bit legacy"),
    GGUFType("Q4_K_M", 15, "Q4_K", note="4-bit k-quant mix: the usual laptop choice (+0.18 ppl on Llama-3-8B)"),
    GGUFType("Q4_K_S", 14, "Q4_K", note="4-bit k-quant, fewer upgraded tensors"),
    GGUFType("Q4_1", 3, "Q4_1", note="4-bit legacy with offsets"),
    GGUFType("Q4_0", 2, "Q4_0", note="4-bit legacy: the fastest 4-bit on CPUs (+0.47 ppl on Llama-3-8B)"),
    GGUFType("IQ4_NL", 25, "IQ4_NL", note="4-bit non-linear, 32-wide blocks"),
    GGUFType("IQ4_XS", 30, "IQ4_XS", note="4.25-bit non-linear"),
    GGUFType("Q3_K_L", 13, "Q3_K", note="3-bit k-quant mix, most upgrades"),
    GGUFType("Q3_K_M", 12, "Q3_K", note="3-bit k-quant mix (+0.66 ppl on Llama-3-8B)"),
    GGUFType("Q3_K_S", 11, "Q3_K", note="3-bit k-quant"),
    GGUFType("IQ3_M", 27, "IQ3_S", note="3.66-bit i-quant mix"),
    GGUFType("IQ3_S", 26, "IQ3_S", note="3.44-bit i-quant"),
    GGUFType("IQ3_XS", 22, "IQ3_S", needs_imatrix=True, note="3.3-bit i-quant mix (some tensors IQ3_XXS)"),
    GGUFType("IQ3_XXS", 23, "IQ3_XXS", needs_imatrix=True, note="3.06-bit i-quant"),
    GGUFType("Q2_K", 10, "Q2_K", note="2-bit k-quant mix (+3.5 ppl on Llama-3-8B)"),
    GGUFType("Q2_K_S", 21, "Q2_K", needs_imatrix=True, note="2-bit k-quant, smaller"),
    GGUFType("IQ2_M", 29, "IQ2_S", needs_imatrix=True, note="2.7-bit i-quant mix"),
    GGUFType("IQ2_S", 28, "IQ2_XS", needs_imatrix=True, note="2.5-bit i-quant mix"),
    GGUFType("IQ2_XS", 20, "IQ2_XS", needs_imatrix=True, note="2.31-bit i-quant"),
    GGUFType("IQ2_XXS", 19, "IQ2_XXS", needs_imatrix=True, note="2.06-bit i-quant"),
    GGUFType("IQ1_M", 31, "IQ1_M", needs_imatrix=True, note="1.75-bit i-quant: large models only"),
    GGUFType("IQ1_S", 24, "IQ1_S", needs_imatrix=True, note="1.56-bit i-quant: large models only"),
]

#: name -> type, in the order the CLI and the tab list them (best quality first)
GGUF_TYPES: dict[str, GGUFType] = {t.name: t for t in _TABLE}


def gguf_type(name: str) -> GGUFType:
    """The type called *name* (case-insensitive); an unknown name raises GGUFExportError listing the known ones."""
    from modules.quantize.errors import GGUFExportError

    found = GGUF_TYPES.get(str(name).upper())
    if found is None:
        raise GGUFExportError(f"Unknown GGUF type {name!r}; known types: {', '.join(GGUF_TYPES)}")
    return found


def type_name_for_ftype(ftype: int) -> str | None:
    """The name of a ``general.file_type`` value, or None for one this table does not list."""
    for t in _TABLE:
        if t.ftype == ftype:
            return t.name
    return None
