"""Text -> normalized vectors: sentence-transformers encoders and hashed character n-grams.

Both return float32 arrays with unit rows, so inner product is cosine similarity.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from guidealign.core.ids import normalize


def normalize_text(s: str) -> str:
    """The comparison form of a guideline: the prompt id rule's normalization (NFKC,
    whitespace collapsed, stripped; :func:`guidealign.core.ids.normalize`), then case-folded.

    The case folding is deliberate and is why this is not ``normalize`` itself: guidelines
    that differ only in case are the same guideline, while prompt ids must stay
    case-sensitive (and must never change for the same text)."""
    return normalize(s).casefold()


# letters with a stroke or other mark that Unicode does not decompose, as their plain letter
_UNMARKED = str.maketrans({"đ": "d", "ł": "l", "ø": "o", "ħ": "h", "ŧ": "t", "ı": "i"})


def fold_marks(s: str) -> str:
    """``s`` without accents and other combining marks ("không" -> "khong"; Hangul and other
    text without such marks is unchanged). Only for the library's n-gram candidate search:
    text with its accents stripped in places keeps a high ``fuzz.ratio`` with the original but
    shares few 3-grams with it (cosine 0.25-0.47 for Vietnamese sentences); the merge itself
    compares the unfolded text."""
    if s.isascii():
        return s
    import unicodedata

    d = unicodedata.normalize("NFKD", s)
    return unicodedata.normalize("NFC", "".join(c for c in d if not unicodedata.combining(c))).translate(_UNMARKED)


def doc_text(title: str | None, text: str | None) -> str:
    """What the retriever embeds for a guideline: its title and text (once, when a guideline
    written as a title alone has that title as its text in the library)."""
    title = (title or "").strip()
    text = (text or "").strip()
    if title and text and title != text:
        return f"{title}: {text}"
    return title or text


def load_encoder(name: str, *, max_seq_length: int | None = None, device: str | None = None,
                 float32: bool = False):
    """A SentenceTransformer from a path, Hub id or embedded name (guidealign.models.resolve).
    ``float32``: its weights in float32 whatever dtype they are stored in (for training:
    transformers loads a model in its stored dtype, and AdamW steps of ~2e-5 on bfloat16
    weights round away, so a bf16-stored encoder trained in place learned almost nothing)."""
    from sentence_transformers import SentenceTransformer

    from guidealign.core.models import resolve

    if device is None:
        from guidealign.core.gpu import torch_device

        device = torch_device()
    kwargs = {}
    if float32:
        import torch

        kwargs["model_kwargs"] = {"dtype": torch.float32}
    model = SentenceTransformer(resolve(name), device=device, **kwargs)
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return model


def encode(model, texts: Sequence[str], *, batch_size: int = 256, chunk: int = 16384) -> np.ndarray:
    """Encode ``texts`` into unit float32 rows, ``chunk`` texts at a time (bounded memory;
    sentence-transformers sorts each chunk by length, so padding stays small)."""
    dim = model.get_embedding_dimension()
    out = np.empty((len(texts), dim), dtype=np.float32)
    for s in range(0, len(texts), chunk):
        part = list(texts[s:s + chunk])
        out[s:s + len(part)] = model.encode(part, batch_size=batch_size, normalize_embeddings=True,
                                            convert_to_numpy=True, show_progress_bar=False)
    return out


def ngram_vectors(texts: Sequence[str], dim: int = 256, n: int = 3, chunk: int = 50_000) -> np.ndarray:
    """Signed, hashed character n-gram count vectors, L2-normalized (vectorized numpy).

    Cosine similarity of these vectors tracks the character overlap that ``fuzz.ratio``
    measures, so they are a cheap candidate space for near-duplicate search.
    """
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for s in range(0, len(texts), chunk):
        part = texts[s:s + chunk]
        bs = [t.encode("utf-8", "replace").replace(b"\x00", b" ") for t in part]
        lens = np.fromiter((len(b) for b in bs), dtype=np.int64, count=len(bs))
        buf = np.frombuffer(b"\x00".join(bs) + b"\x00" * n, dtype=np.uint8).astype(np.uint32)
        seg = np.repeat(np.arange(len(bs), dtype=np.int64), lens + 1)
        m = seg.size
        if m < n:
            continue
        h = np.zeros(m - n + 1, dtype=np.uint32)
        ok = np.ones(m - n + 1, dtype=bool)
        for j in range(n):
            b = buf[j:j + m - n + 1]
            h = h * np.uint32(0x01000193) ^ b
            ok &= b != 0
        # a final avalanche so that nearby n-grams spread over the buckets
        h ^= h >> np.uint32(15)
        h *= np.uint32(0x2C1B3C6D)
        h ^= h >> np.uint32(12)
        sign = np.where(h & np.uint32(1 << 31), -1.0, 1.0)
        bucket = (h % np.uint32(dim)).astype(np.int64)
        idx = seg[:m - n + 1][ok] * dim + bucket[ok]
        vec = np.bincount(idx, weights=sign[ok], minlength=len(bs) * dim).reshape(len(bs), dim)
        out[s:s + len(bs)] = vec
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out
