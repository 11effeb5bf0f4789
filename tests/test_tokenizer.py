"""coop_min.tokenizer against ids worked out by hand, Hugging Face's CLIPTokenizer, `regex` and ftfy.

The Hugging Face reference is built from vocab.json / merges.txt written here from the shipped
merges file by OpenAI's recipe; its BPE and byte-level splitting are the `tokenizers` library's
own. It does not run OpenAI's basic_clean (ftfy, html.unescape twice), so the reference applies
that first, written out below as OpenAI's simple_tokenizer.py has it.
"""
import gzip
import html
import json
import unicodedata

import pytest
import torch

from coop_min import tokenizer
from coop_min.tokenizer import EOT, SOT

OPENAI_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

CLASS_NAMES = [  # a sample of the 11 CoOp datasets' class names, as the split files spell them
    "tench", "great white shark", "African rock python", "Shih-Tzu", "jack-o'-lantern",
    "potter's wheel", "yellow lady's slipper", "carousel", "Chihuahua",  # ImageNet
    "accordion", "Motorbikes", "Faces_easy", "yin_yang",  # Caltech101
    "abyssinian", "american_bulldog", "Egyptian Mau", "staffordshire_bull_terrier",  # OxfordPets
    "2012 Tesla Model S", "2000 AM General Hummer SUV", "2012 BMW M3 coupe",
    "2007 Chevrolet Express Cargo Van", "smart fortwo Convertible 2012",  # StanfordCars
    "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "bird of paradise",  # Flowers102
    "apple_pie", "baby back ribs", "creme brulee", "Crème brûlée", "eggs benedict", "pho",  # Food101
    "707-320", "Boeing 737-200", "A300B4", "BAE 146-200", "DHC-8-100", "F/A-18", "MD-11",
    "Tu-134", "Yak-42", "Cessna 172", "DC-3", "Falcon 2000", "Il-76",  # FGVCAircraft
    "abbey", "airplane cabin", "apartment building/outdoor", "bayou", "water tower",  # SUN397
    "banded", "blotchy", "crosshatched", "zigzagged",  # DTD
    "Annual Crop Land", "Herbaceous Vegetation Land", "Highway or Road", "Sea or Lake",  # EuroSAT
    "Apply_Eye_Makeup", "Apply_Lipstick", "Yo_Yo", "Jumping_Jack", "Playing_Daf",  # UCF101
]
PROMPTS = ["a photo of a {}.", "a photo of a {}, a type of pet.", "a centered satellite photo of {}.",
           "a photo of a person doing {}.", "itap of a {}.", "a bad photo of the {}."]
TEXTS = [
    "Hello, World!!", "what?! ... (yes) [no] {maybe} <tag>", "a--b__c..d", "semi;colon:colon",
    "it's", "don't", "we're", "they've", "I'm", "you'll", "he'd", "IT'S", "'s alone", "rock 'n' roll",
    "café", "naïve façade", "Ångström", "São Paulo", "Zürich straße", "ÉCOLE",
    "日本語のテキスト", "中文分词", "한국어 문장", "Привет мир", "Ελληνικά", "עברית", "العربية", "हिन्दी",
    "🐱 cat", "👍🏽", "🇫🇷 flag", "👨‍👩‍👧", "☃ snowman", "♥♦♣♠",
    "&amp;", "&lt;b&gt;bold&lt;/b&gt;", "Tom &amp; Jerry", "&amp;amp;", "&#39;quoted&#39;",
    "&quot;x&quot;",
    "0", "1234567890", "3.14159", "10,000", "1st 2nd 3rd", "x²", "½ cup", "Ⅻ", "٣", "２０２３",
    "  leading", "trailing  ", "tabs\tand\nnew\r\nlines", "no\u00a0break\u3000space", "", "   ",
    "don’t", "“curly”", "ﬁsh ﬂour", "ＦＵＬＬ width", "ﾊﾝｶｸ", "\x93quoted\x94", "tab\x00null",
    "e\u0301 combining", "Dz ǅ ǆ", "ſtreet",
]
CORPUS = CLASS_NAMES + [p.format(c) for p in PROMPTS for c in CLASS_NAMES[::7]] + TEXTS
# mojibake: only ftfy repairs it, so the fallback gives other ids (as the module docstring says)
MOJIBAKE = ["cafÃ©", "Ã©cole", "donâ€™t"]


def _byte_chars():
    """OpenAI's byte -> character table: printable Latin-1 bytes map to themselves, in byte order;
    the other 68 follow, mapped to U+0100 on."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(0x100 + i) for i in range(len(others))]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from tokenizers.pre_tokenizers import ByteLevel
    chars = _byte_chars()
    assert sorted(chars) == sorted(ByteLevel.alphabet())  # the byte alphabet of `tokenizers`
    with gzip.open(tokenizer.BPE_PATH, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]
    vocab = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("hf_clip")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return transformers.CLIPTokenizer.from_pretrained(folder)


def _reference_ids(hf, text):
    ftfy = pytest.importorskip("ftfy")
    cleaned = html.unescape(html.unescape(ftfy.fix_text(text))).strip()  # OpenAI's basic_clean
    return hf.encode(cleaned, add_special_tokens=False)


@pytest.fixture(params=["regex+ftfy", "stdlib"])
def ours(request, monkeypatch):
    if request.param == "regex+ftfy":
        pytest.importorskip("regex")
        pytest.importorskip("ftfy")
    else:
        monkeypatch.setattr(tokenizer, "regex", None)
        monkeypatch.setattr(tokenizer, "ftfy", None)
    return tokenizer.Tokenizer()


def test_known_ids_by_hand():
    # 'a</w>' is byte 'a' (the 64th printable byte) + 256; 'x</w>' likewise 87 + 256
    tokens = tokenizer.tokenize(["a photo of a", "X X X X", "2012 Tesla Model S", "707-320"])
    assert tokens.dtype == torch.long and tokens.shape == (4, 77)
    assert tokens[0].tolist() == [SOT, 320, 1125, 539, 320, EOT] + [0] * 71
    assert tokens[1, :6].tolist() == [SOT, 343, 343, 343, 343, EOT]
    assert tokens[2, :9].tolist() == [SOT, 273, 271, 272, 273, 12254, 2863, 338, EOT]  # digits one by one
    assert tokens[3, :9].tolist() == [SOT, 278, 271, 278, 268, 274, 273, 271, EOT]
    assert (SOT, EOT) == (49406, 49407)


def test_vocabulary_layout():
    tok = tokenizer.Tokenizer()
    assert len(tok.decoder) == tokenizer.VOCAB_SIZE == 49408
    assert [tok.decoder[i] for i in (0, 93, 94, 255, 256, 320, 1125)] == \
        ["!", "~", "¡", "Ń", "!</w>", "a</w>", "photo</w>"]
    assert tokenizer.token_string(SOT) == "<|startoftext|>"
    assert tokenizer.token_string(EOT) == "<|endoftext|>"


def test_ids_match_hf_clip_tokenizer(ours, hf_tokenizer):
    mismatched = [t for t in CORPUS if ours.encode(t) != _reference_ids(hf_tokenizer, t)]
    assert mismatched == []


def test_fallback_differs_only_on_mojibake(monkeypatch, hf_tokenizer):
    monkeypatch.setattr(tokenizer, "regex", None)
    monkeypatch.setattr(tokenizer, "ftfy", None)
    fallback = tokenizer.Tokenizer()
    differing = [t for t in CORPUS + MOJIBAKE
                 if fallback.encode(t) != _reference_ids(hf_tokenizer, t)]
    assert differing == MOJIBAKE


def test_stdlib_word_pattern_matches_regex_on_every_code_point():
    regex = pytest.importorskip("regex")
    reference = regex.compile(OPENAI_PATTERN, regex.IGNORECASE)
    # code points that Python's (older) Unicode database leaves unassigned may be letters to `regex`
    chars = [chr(c) for c in range(0x110000)
             if not 0xD800 <= c < 0xE000 and unicodedata.category(chr(c)) != "Cn"]
    for context in ("a{}b", "1{}!", "'{}"):
        text = " ".join(context.format(c) for c in chars)
        assert tokenizer._stdlib_pattern().findall(text) == reference.findall(text), context


def test_ftfy_fallback_cleans_each_character_as_ftfy(monkeypatch):
    ftfy = pytest.importorskip("ftfy")
    monkeypatch.setattr(tokenizer, "ftfy", None)
    chars = [chr(c) for c in [*range(0x3000), *range(0xFB00, 0x10000)]]
    differing = [c for c in chars if " ".join(ftfy.fix_text(f"a{c}b").split()) !=
                 " ".join(tokenizer._fix_text(f"a{c}b").split())]
    assert differing == []


def test_tokenize_pads_with_zeros_after_eot():
    tokens = tokenizer.tokenize(["", "a", "a photo"], context_length=5)
    assert tokens.tolist() == [[SOT, EOT, 0, 0, 0], [SOT, 320, EOT, 0, 0], [SOT, 320, 1125, EOT, 0]]
    assert tokenizer.tokenize([]).shape == (0, 77)


def test_too_long_text_raises_with_its_length():
    with pytest.raises(ValueError, match="82 tokens"):
        tokenizer.tokenize("a " * 80)
    with pytest.raises(ValueError, match="context_length"):
        tokenizer.tokenize("a", context_length=1)
    with pytest.raises(TypeError, match="int"):
        tokenizer.tokenize(["a", 3])


def test_truncate_keeps_eot_last():
    tokens = tokenizer.tokenize(["a " * 80, "a"], truncate=True)
    assert tokens[0].tolist() == [SOT] + [320] * 75 + [EOT]
    assert tokens[1, :3].tolist() == [SOT, 320, EOT]


def test_decode_round_trip():
    # as OpenAI: every word ends in '</w>', decoded to a space; text comes back cleaned
    for text, expected in [("a photo of a dog.", "a photo of a dog . "),
                           ("Crème  BRÛLÉE", "crème brûlée "),
                           ("it's 2012!", "it 's 2 0 1 2 ! "),
                           ("猫 🐱", "猫 🐱 ")]:
        assert tokenizer.decode(tokenizer.encode(text)) == expected
    row = tokenizer.tokenize("a photo of a dog")[0]
    assert tokenizer.decode(row[1:int(row.argmax())]) == "a photo of a dog "


def test_bad_ids_raise():
    with pytest.raises(ValueError, match="49408"):
        tokenizer.decode([320, 49408])
    with pytest.raises(ValueError, match="-1"):
        tokenizer.token_string(-1)
