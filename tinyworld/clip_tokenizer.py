"""open_clip's CLIP BPE vocabulary as a transformers `CLIPTokenizer` with identical ids.

open_clip ships OpenAI CLIP's byte-level BPE merges (`bpe_simple_vocab_16e6.txt.gz`). Its
`SimpleTokenizer` builds the vocabulary deterministically from them: the 256 byte symbols,
the same 256 with the end-of-word marker `</w>`, one entry per merge (the first
49152 - 256 - 2 merges), then the two special tokens — 49408 ids in all, `<start_of_text>`
= 49406 and `<end_of_text>` = 49407. We rebuild that list, name the special tokens the way
transformers' CLIP does (`<|startoftext|>`, `<|endoftext|>`), and write `vocab.json` +
`merges.txt`, which `CLIPTokenizer.from_pretrained` reads.

Padding: open_clip pads with id 0 (the byte symbol "!"), so the tokenizer's pad token is "!"
(as in Stable Diffusion 2's tokenizer, built for OpenCLIP ids); with `padding="max_length",
max_length=77, truncation=True` a caption's ids equal `open_clip.tokenize(caption)` row for row.

Known differences, both outside the captions this project uses:
- "!" in the text: transformers splits the pad token out before BPE, so "hi!" gives
  [.., "hi", 0] where open_clip gives [.., "hi", "!</w>" = 256] ("!!" likewise splits into
  two 0s). SD-2's tokenizer behaves the same way.
- HTML entities and mojibake: open_clip runs `ftfy.fix_text` and unescapes HTML ("&amp;" →
  "&") first; transformers' CLIP tokenizer only applies NFC, collapses whitespace and lowercases.
Ordinary text (any case or spacing, punctuation other than "!", digits, accents, emoji, CJK)
tokenizes identically.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

VOCAB_SIZE = 49408
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|startoftext|>", "<|endoftext|>", "!"
BOS_ID, EOS_ID, PAD_ID = 49406, 49407, 0
MODEL_MAX_LENGTH = 77
_N_MERGES = 49152 - 256 - 2  # what open_clip's SimpleTokenizer keeps


def open_clip_bpe_path() -> Path:
    """open_clip's bundled BPE merges file, found without importing open_clip (which imports torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the CLIP tokenizer needs the open-clip-torch package; run `pip install open-clip-torch`")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise ValueError(f"open_clip has no BPE vocabulary at {path}; reinstall open-clip-torch")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte → printable unicode map (the same table open_clip and GPT-2 use)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@lru_cache(maxsize=2)
def clip_vocab_and_merges(bpe_path: Path | None = None) -> tuple[dict[str, int], tuple[str, ...]]:
    """open_clip's vocabulary (token → id, 49408 entries) and its merges ("a b" strings, in rank order)."""
    path = bpe_path or open_clip_bpe_path()
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = tuple(lines[1 : _N_MERGES + 1])  # line 0 is a version header
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    assert vocab[BOS_TOKEN] == BOS_ID and vocab[EOS_TOKEN] == EOS_ID and vocab[PAD_TOKEN] == PAD_ID
    return vocab, merges


def write_clip_vocab(out_dir: Path) -> Path:
    """Write `vocab.json`, `merges.txt` and a `tokenizer_config.json` to `out_dir`; returns it."""
    vocab, merges = clip_vocab_and_merges()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "model_max_length": MODEL_MAX_LENGTH,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def build_clip_tokenizer(out_dir: Path):
    """A transformers `CLIPTokenizer` with open_clip's ids, written to and loaded from `out_dir`."""
    from transformers import CLIPTokenizer

    write_clip_vocab(out_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(out_dir))
    assert tokenizer.pad_token_id == PAD_ID and tokenizer.eos_token_id == EOS_ID, (
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
    )
    return tokenizer
