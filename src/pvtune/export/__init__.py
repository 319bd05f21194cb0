"""Writing compressed models in the formats other engines run (GGUF for llama.cpp) and
reading those formats back."""

from pvtune.export.gguf import GGUFExportConfig, GGUFExportReport, export_gguf, import_gguf_linears
from pvtune.export.gguf_file import GGUFContents, GGUFTensor, read_gguf

__all__ = ["GGUFContents", "GGUFExportConfig", "GGUFExportReport", "GGUFTensor", "export_gguf",
           "import_gguf_linears", "read_gguf"]
