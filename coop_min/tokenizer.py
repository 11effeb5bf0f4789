"""OpenAI CLIP's byte-level BPE tokenizer: the same ids as `clip.tokenize`.

The pipeline of OpenAI's `SimpleTokenizer`, step for step:

    ftfy.fix_text -> html.unescape twice -> strip -> collapse whitespace -> lowercase
    -> split into words (_PATTERN) -> UTF-8 bytes as printable characters -> BPE, the last
    symbol of a word ending in '</w>' -> ids

The vocabulary (49408 ids) is built from the shipped merges file as OpenAI builds it: the 256 byte
characters, the same with '</w>', the first 48894 merges, then <|startoftext|> and <|endoftext|>.
The merges file is OpenAI's `bpe_simple_vocab_16e6.txt.gz` (MIT, see LICENSE-CLIP-BPE).

Neither `ftfy` nor `regex` is required:
- Without `regex` (for \\p{L} and \\p{N}) the word pattern is rebuilt for the stdlib `re` from
  `unicodedata` categories, with the same matches; the only difference left is for characters
  that Python's Unicode database (older than `regex`'s) does not assign yet.
- Without `ftfy` the table-driven parts of `ftfy.fix_text` are applied (Latin ligatures,
  full/half-width forms, curly quotes, C0/C1 control characters, NFC): on any one character they
  give the same cleaned text as ftfy. Its mojibake repair is not ('cafÃ©' stays as it is), nor
  its decoding of all-caps or thrice-escaped HTML entities, ANSI escapes or lone surrogates: ids
  for such text differ from OpenAI's.
"""
import gzip
import html
import re
import unicodedata
from functools import cache
from pathlib import Path

import torch

try:
    import ftfy
except ImportError:
    ftfy = None
try:
    import regex
except ImportError:
    regex = None

SOT = 49406  # <|startoftext|>
EOT = 49407  # <|endoftext|>
VOCAB_SIZE = 49408
BPE_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")

_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
_N_MERGES = VOCAB_SIZE - 256 - 256 - len(_SPECIALS)  # 48894, OpenAI's `49152-256-2`
_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
            r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
# Unicode White_Space: what \s is in `regex` (stdlib `re` adds U+1C..U+1F)
_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WHITE_SPACE_RUN = re.compile(f"[{_WHITE_SPACE}]+")


def _bytes_to_unicode():
    """Byte -> printable character: printable Latin-1 bytes stand for themselves, the other 68
    bytes for the characters from U+0100 on, so BPE never sees whitespace or control bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    moved = [b for b in range(256) if b not in keep]
    chars = [chr(b) for b in keep] + [chr(256 + n) for n in range(len(moved))]
    return dict(zip(keep + moved, chars))


# ----------------------------------------------------------------------------- text cleaning

@cache
def _ftfy_tables():
    """translate() table of the parts of ftfy.fix_text that are look-ups (ftfy/chardata.py)."""
    table = {c: unicodedata.normalize("NFKC", chr(c)) for c in map(ord, "ĲĳŉǱǲǳǄǅǆǇǈǉǊǋǌﬀﬁﬂﬃﬄﬆ")}
    table[ord("ﬅ")] = "ſt"  # ftfy keeps the long s that NFKC would flatten
    for c in range(0xFF01, 0xFFF0):  # full-width ASCII, half-width katakana and hangul
        if (plain := unicodedata.normalize("NFKC", chr(c))) != chr(c):
            table[c] = plain
    table[0x3000] = " "
    # C1 controls are Windows-1252 bytes read as Latin-1; the five bytes cp1252 leaves undefined stay
    table.update({c: bytes([c]).decode("cp1252") for c in range(0x80, 0xA0)
                  if c not in (0x81, 0x8D, 0x8F, 0x90, 0x9D)})
    table.update({c: "'" for c in (0x02BC, 0x2018, 0x2019, 0x201A, 0x201B)})
    table.update({c: '"' for c in range(0x201C, 0x2020)})
    controls = [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
                *range(0xFFF9, 0xFFFD)]
    table.update(dict.fromkeys(controls))
    # ftfy repeats its fixes until nothing changes: 'ŉ' -> 'ʼn' -> "'n"
    return {c: s if s is None else s.translate(table) for c, s in table.items()}


def _fix_text(text):
    if ftfy is not None:
        return ftfy.fix_text(text)
    return unicodedata.normalize("NFC", text.translate(_ftfy_tables()))


def _clean(text):
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    return _WHITE_SPACE_RUN.sub(" ", text).strip().lower()


# ----------------------------------------------------------------------------- word splitting

def _class(ranges):
    return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)


@cache
def _stdlib_pattern():
    """_PATTERN for the stdlib `re`: \\p{L} and \\p{N} spelled out as code point ranges."""
    ranges = {"L": [], "N": []}
    for c in range(0x110000):
        runs = ranges.get(unicodedata.category(chr(c))[0])
        if runs is None:
            continue
        if runs and runs[-1][1] == c - 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    letters, numbers = _class(ranges["L"]), _class(ranges["N"])
    # With IGNORECASE `regex` matches U+0345 (it case-folds to iota) with no branch: it is skipped
    # like a space. Only the literal branches are case-insensitive here, so say it explicitly.
    return re.compile(rf"(?i:<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d)"
                      rf"|[{letters}]+|[{numbers}]|[^{_WHITE_SPACE}{letters}{numbers}\u0345]+")


def _word_pattern():
    if regex is not None:
        return regex.compile(_PATTERN, regex.IGNORECASE)
    return _stdlib_pattern()


# ----------------------------------------------------------------------------- the tokenizer

class Tokenizer:
    """Text <-> CLIP token ids. `decoder[id]` is the token string, e.g. 'photo</w>'."""

    def __init__(self, bpe_path=BPE_PATH):
        if not Path(bpe_path).is_file():
            raise FileNotFoundError(f"BPE merges file {bpe_path} not found; reinstall coop_min "
                                    "or pass the path of bpe_simple_vocab_16e6.txt.gz")
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1:_N_MERGES + 1]  # line 0 is the '#version' header
        merges = [tuple(line.split()) for line in lines]
        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        chars = list(self.byte_encoder.values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + list(_SPECIALS)
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.bpe_ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.cache = {_SPECIALS[0]: [SOT], _SPECIALS[1]: [EOT]}  # word -> ids
        self.pattern = _word_pattern()

    def _bpe(self, word):
        """Ids of one word (in byte characters): merge the lowest-ranked adjacent pair, all its
        occurrences left to right, until no pair is a merge."""
        if word in self.cache:
            return self.cache[word]
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if pair not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = [self.encoder[s] for s in symbols]
        self.cache[word] = ids
        return ids

    def encode(self, text):
        ids = []
        for word in self.pattern.findall(_clean(text)):
            ids += self._bpe("".join(self.byte_encoder[b] for b in word.encode("utf-8")))
        return ids

    def decode(self, ids):
        """As OpenAI: every '</w>' becomes a space (so the text ends with one), bad UTF-8 -> U+FFFD."""
        ids = [int(i) for i in ids]
        if bad := [i for i in ids if not 0 <= i < VOCAB_SIZE]:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {VOCAB_SIZE})")
        chars = "".join(self.decoder[i] for i in ids)
        text = bytes(self.byte_decoder[c] for c in chars).decode("utf-8", errors="replace")
        return text.replace("</w>", " ")


@cache
def _default():
    return Tokenizer()


def encode(text):
    """BPE ids of `text`, without SOT/EOT."""
    return _default().encode(text)


def decode(ids):
    return _default().decode(ids)


def token_string(i):
    """The vocabulary entry of id `i`, e.g. token_string(1125) == 'photo</w>'."""
    if not 0 <= i < VOCAB_SIZE:
        raise ValueError(f"token id {i} is outside the vocabulary [0, {VOCAB_SIZE})")
    return _default().decoder[i]


def token_text(i):
    """Token `i` as a person reads it: 'photo' for 'photo</w>' (a word's end), 'pho-' for a piece
    inside a word, its bytes in hex for a piece that is no text on its own ('<f09f94>'); never a space."""
    entry = token_string(i)
    if entry.startswith("<|"):                          # <|startoftext|>, <|endoftext|>
        return entry
    piece = entry.removesuffix("</w>")
    raw = bytes(_default().byte_decoder[c] for c in piece)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = f"<{raw.hex()}>"
    return text if entry.endswith("</w>") else text + "-"


def tokenize(texts, context_length=77, truncate=False):
    """SOT + ids + EOT of each text, zero-padded: LongTensor (N, context_length), as `clip.tokenize`.

    A text too long raises ValueError, or with truncate=True is cut to context_length with EOT last.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if context_length < 2:
        raise ValueError(f"context_length={context_length} leaves no room for SOT and EOT; use >= 2")
    result = torch.zeros(len(texts), context_length, dtype=torch.long)  # (N, L)
    for row, text in zip(result, texts):
        if not isinstance(text, str):
            raise TypeError(f"tokenize takes a str or a list of str, got {type(text).__name__} {text!r}")
        ids = [SOT, *encode(text), EOT]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(f"text {text!r} is {len(ids)} tokens with SOT and EOT, more than "
                                 f"context_length={context_length}; shorten it or pass truncate=True")
            ids = ids[:context_length - 1] + [EOT]
        row[:len(ids)] = torch.tensor(ids)
    return result
