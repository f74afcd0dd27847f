"""Text corpus, tokenizer and token batches of the LM workflow (offline, deterministic, cached).

Corpus: ``stdlib`` (the running Python's standard-library ``.py`` sources, site-packages excluded: a corpus
that exists on every machine) or a path: a folder (every non-binary file under it) or one text file
(cut into 200-line pieces so it can be split like a folder). Each file goes to a split by a hash of its
relative path, so the split does not depend on the machine, the file order or the corpus size:
train 90 %, validation 5 %, and a held-out 5 % for fine-tuning (itself 80/20 into finetune_train /
finetune_validation). ``corpus_mb`` keeps the first files of each split in hash order up to that many MB
(validation and fine-tuning slices: a tenth of it), for quick runs.

Tokenizer: ``bpe`` (a byte-level BPE trained with ``tokenizers`` on the train split, at most 8 MB of it)
or ``bytes`` (UTF-8 bytes, vocabulary 257). Documents are joined with an end-of-text token. Tokenizer and
token arrays are cached under ``cache_dir`` keyed by the file list (paths, sizes, mtimes) and settings;
a run keeps its tokenizer.json in its checkpoint, so ``--resume`` never depends on the cache.

Batches: the train tokens are cut into windows of seq_len + 1 (stride seq_len); epoch e visits them in
the order torch.randperm(seed + e); global step s takes the next global-batch windows of that sequence
and DDP rank r its r-th equal share. The data position is therefore a function of the step alone, which
is what makes resume and 1-vs-N-process runs follow the same curve.
"""
import hashlib
import json
import os
import pathlib
import sys
import sysconfig
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..checkpoint import atomic_write
from ..guards import fail
from . import require

SPLITS = ("train", "validation", "finetune_train", "finetune_validation")
EOT = "<|endoftext|>"
BPE_SAMPLE_BYTES = 8 << 20
_PIECE_LINES = 200
_FORMAT = 1




def default_cache_dir() -> str:
    return os.environ.get("OPT_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "opt_fast", "lm")


# ---- files and splits ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Doc:
    key: str       # relative path (":k" suffix for a piece of a single file): what the split hashes
    path: str
    piece: int     # -1: the whole file
    size: int
    mtime_ns: int


def _hash(s: str, salt: str = "") -> int:
    return int(hashlib.sha1((salt + s).encode()).hexdigest()[:12], 16)


def split_of(key: str) -> str:
    h = _hash(key) % 100
    if h < 90:
        return "train"
    if h < 95:
        return "validation"
    return "finetune_validation" if _hash(key, "ft") % 5 == 0 else "finetune_train"


def _is_binary(path: str) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(4096)


def list_docs(corpus: str) -> List[Doc]:
    if corpus == "stdlib":
        root = sysconfig.get_paths()["stdlib"]
        skip = {"site-packages", "dist-packages", "__pycache__"}
        want = lambda name: name.endswith(".py")  # noqa: E731
    else:
        root = os.path.abspath(os.path.expanduser(corpus))
        if os.path.isfile(root):
            st = os.stat(root)
            with open(root, "rb") as f:
                n_lines = f.read().count(b"\n") + 1
            name = os.path.basename(root)
            return [Doc(f"{name}:{k}", root, k, st.st_size, st.st_mtime_ns)
                    for k in range((n_lines + _PIECE_LINES - 1) // _PIECE_LINES)]
        if not os.path.isdir(root):
            fail(f"--corpus {corpus!r}: no such file or folder (use 'stdlib' or a path to text)")
        skip = {"__pycache__"}
        want = lambda name: not name.startswith(".")  # noqa: E731
    docs = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip and not d.startswith("."))
        for name in sorted(files):
            path = os.path.join(folder, name)
            if not want(name) or not os.path.isfile(path):
                continue
            st = os.stat(path)
            if st.st_size == 0 or (corpus != "stdlib" and _is_binary(path)):
                continue
            docs.append(Doc(os.path.relpath(path, root).replace(os.sep, "/"), path, -1, st.st_size, st.st_mtime_ns))
    if not docs:
        fail(f"--corpus {corpus!r}: no text files found")
    return docs


def split_docs(docs: List[Doc], corpus_mb: Optional[float]) -> Dict[str, List[Doc]]:
    out = {s: [] for s in SPLITS}
    for d in sorted(docs, key=lambda d: _hash(d.key, "order")):  # hash order: a limit takes a random subset
        out[split_of(d.key)].append(d)
    if corpus_mb is not None:
        for s in SPLITS:
            budget, kept = corpus_mb * (1 << 20) / (1 if s == "train" else 10), []
            for d in out[s]:
                if kept and budget <= 0:
                    break
                kept.append(d)
                budget -= d.size if d.piece < 0 else d.size / max(1, len(out[s]))
            out[s] = kept
    for s in ("train", "validation"):
        if not out[s]:
            fail(f"the corpus has no file in the {s} split ({len(docs)} files in all); give a larger corpus")
    return out


def read_doc(d: Doc) -> str:
    with open(d.path, "r", encoding="utf-8", errors="replace") as f:
        if d.piece < 0:
            return f.read()
        lines = f.read().split("\n")
    return "\n".join(lines[d.piece * _PIECE_LINES:(d.piece + 1) * _PIECE_LINES])


# ---- tokenizers ------------------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes; id 256 is the end-of-text token."""
    kind = "bytes"
    eot_id = 256

    def vocab_size(self) -> int:
        return 257

    def encode_docs(self, texts: List[str]) -> List[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]

    def to_json(self) -> str:
        return json.dumps({"kind": "bytes"})


class BPETokenizer:
    """A ``tokenizers`` byte-level BPE (special token <|endoftext|> = id 0)."""
    kind = "bpe"

    def __init__(self, tok):
        self.tok = tok
        self.eot_id = tok.token_to_id(EOT)

    @classmethod
    def train(cls, texts: List[str], vocab_size: int) -> "BPETokenizer":
        require("tokenizers")
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_json(cls, text: str) -> "BPETokenizer":
        require("tokenizers")
        from tokenizers import Tokenizer
        return cls(Tokenizer.from_str(text))

    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode_docs(self, texts: List[str]) -> List[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def to_json(self) -> str:
        return self.tok.to_str()

    def hf_tokenizer(self):
        """A transformers PreTrainedTokenizerFast (for save_pretrained next to an exported model)."""
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast(tokenizer_object=self.tok, eos_token=EOT, bos_token=EOT, unk_token=None)


def tokenizer_from_json(text: str):
    return ByteTokenizer() if json.loads(text).get("kind") == "bytes" else BPETokenizer.from_json(text)


# ---- cache -----------------------------------------------------------------------------------------------
def _key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _doc_sig(docs: List[Doc]):
    return [(d.key, d.size, d.mtime_ns) for d in docs]


def _read_cache(path: str, read):
    """A cache entry, or None (after saying so) if it cannot be read (truncated, corrupted): it is rebuilt."""
    try:
        return read()
    except Exception as e:   # ValueError / EOFError from numpy, the tokenizers parser's own Exception
        first = (str(e).splitlines() or [""])[0]
        print(f"opt_fast.train: the cache file {path} is unreadable ({type(e).__name__}: {first}); rebuilding it",
              file=sys.stderr)
        return None


def _train_tokenizer(kind: str, vocab: int, train_docs: List[Doc], cache: str):
    if kind == "bytes":
        return ByteTokenizer()
    if kind != "bpe":
        fail(f"unknown --tokenizer {kind!r}; choose bpe or bytes")
    if vocab < 300:
        fail(f"--vocab-size {vocab} is too small for a byte-level BPE (256 byte tokens + merges)")
    path = os.path.join(cache, "tokenizer-" + _key(_FORMAT, vocab, _doc_sig(train_docs)) + ".json")
    if os.path.isfile(path):
        cached = _read_cache(path, lambda: BPETokenizer.from_json(pathlib.Path(path).read_text()))
        if cached is not None:
            return cached
    sample, size = [], 0
    for d in train_docs:
        if size >= BPE_SAMPLE_BYTES:
            break
        sample.append(read_doc(d))
        size += len(sample[-1])
    tok = BPETokenizer.train(sample, vocab)
    atomic_write(path, lambda f: f.write(tok.to_json().encode()))
    return tok


def _encode_split(tok, docs: List[Doc]) -> np.ndarray:
    parts = []
    for i in range(0, len(docs), 256):
        for ids in tok.encode_docs([read_doc(d) for d in docs[i:i + 256]]):
            parts += [ids, np.asarray([tok.eot_id], dtype=np.int64)]
    ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return ids.astype(np.uint16 if tok.vocab_size() <= 65536 else np.int32)


@dataclass
class Corpus:
    tokenizer: object
    tokens: Dict[str, np.ndarray]   # split -> token ids
    files: Dict[str, int]            # split -> number of files
    name: str

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size()


def prepare(corpus: str, tokenizer: str = "bpe", vocab_size: int = 4096, corpus_mb: Optional[float] = None,
            cache_dir: Optional[str] = None, tokenizer_json: Optional[str] = None,
            splits: Tuple[str, ...] = SPLITS) -> Corpus:
    """List, split, tokenize (cached) the corpus. tokenizer_json: reuse a saved tokenizer (resume,
    fine-tuning) instead of the cached/trained one."""
    cache = cache_dir or default_cache_dir()
    by_split = split_docs(list_docs(corpus), corpus_mb)
    if tokenizer_json is not None:
        tok = tokenizer_from_json(tokenizer_json)
    else:
        tok = _train_tokenizer(tokenizer, vocab_size, by_split["train"], cache)
    tok_id = hashlib.sha1(tok.to_json().encode()).hexdigest()[:16]
    tokens = {}
    for s in splits:
        path = os.path.join(cache, f"{s}-" + _key(_FORMAT, tok_id, _doc_sig(by_split[s])) + ".npy")
        if os.path.isfile(path):
            tokens[s] = _read_cache(path, lambda: np.load(path))
            if tokens[s] is not None:
                continue
        tokens[s] = _encode_split(tok, by_split[s])
        atomic_write(path, lambda f: np.save(f, tokens[s]))
    return Corpus(tok, tokens, {s: len(v) for s, v in by_split.items()}, corpus)


# ---- batches ---------------------------------------------------------------------------------------------
class Windows:
    """Windows of seq_len + 1 tokens (stride seq_len) of one split: inputs are [:-1], targets [1:]."""

    def __init__(self, tokens: np.ndarray, seq_len: int, name: str):
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.seq_len = seq_len
        self.count = (len(tokens) - 1) // seq_len
        if self.count < 1:
            fail(f"the {name} split has {len(tokens)} tokens, fewer than --seq-len + 1 = {seq_len + 1}; "
                 f"use a larger corpus or a shorter --seq-len")
        self._perm: Tuple[Optional[tuple], Optional[torch.Tensor]] = (None, None)

    def window(self, k: int) -> torch.Tensor:
        return self.tokens[k * self.seq_len: k * self.seq_len + self.seq_len + 1]

    def stack(self, ks) -> torch.Tensor:
        return torch.stack([self.window(int(k)) for k in ks])

    def train_batch(self, step: int, batch: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """Rank ``rank``'s rows [batch // world, seq_len + 1] of global step ``step``."""
        per = batch // world
        rows = []
        for g in range(step * batch + rank * per, step * batch + (rank + 1) * per):
            epoch, pos = divmod(g, self.count)
            if self._perm[0] != (seed, epoch):
                self._perm = ((seed, epoch), torch.randperm(self.count, generator=torch.Generator().manual_seed(seed + epoch)))
            rows.append(int(self._perm[1][pos]))
        return self.stack(rows)
