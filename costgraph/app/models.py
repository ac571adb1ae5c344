"""The models the app knows, by `--model` name. A new model package is one line here."""
from __future__ import annotations

from costgraph.model import Model
from costgraph.graphs.deepseek_ocr import MODEL as DEEPSEEK_OCR
from costgraph.graphs.deepseek_ocr2 import MODEL as DEEPSEEK_OCR2
from costgraph.graphs.vit import MODEL as VIT

MODELS: dict[str, Model] = {m.name: m for m in (DEEPSEEK_OCR, DEEPSEEK_OCR2, VIT)}
DEFAULT_MODEL = DEEPSEEK_OCR.name


def get_model(name: str | None = None) -> Model:
    """A model by name (default: DeepSeek-OCR)."""
    name = DEFAULT_MODEL if name is None else name
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r} (choose from {', '.join(MODELS)})") from None
