"""mtp_lib.data and scripts/build_data.py: committed data, samples, target positions, errors."""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

import pytest

from mtp_lib import data
from loaders import load_file
from mtp_lib.models import byte_tokenizer
from seeds import fresh_seed

REPO = Path(__file__).resolve().parent.parent
TRANSLATION_FILES = {s: REPO / "data" / "translation" / "bible-es-en" / f"{s}.jsonl.gz"
                     for s in ("train", "validation", "train-kjv")}
BROWN_FILE = REPO / "data" / "open_ended" / "brown-passages.jsonl.gz"


@pytest.fixture(scope="module")
def build_data():
    """scripts/build_data.py as a module (its helpers need no network and no pysword)."""
    return load_file("scripts/build_data.py", "build_data")


@pytest.fixture(scope="module")
def validation() -> list[data.Pair]:
    return data.load_translation("validation")


# --------------------------------------------------------------------------------------------------
# The committed files


def test_committed_files_load_with_datasets():
    datasets = pytest.importorskip("datasets")
    for split, path in TRANSLATION_FILES.items():
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
        assert ds.column_names == ["id", "translation"], ds.column_names
        refs = ("kjv",) if split == "train-kjv" else ("web",)
        assert len(ds) == len(data.load_translation(split.removesuffix("-kjv"), references=refs))
        assert set(ds[0]["translation"]) == {"es", "en"}
    ds = datasets.load_dataset("json", data_files=str(BROWN_FILE), split="train")
    assert ds.column_names == ["id", "genre", "text"]
    assert len(ds) == 100


def test_translation_splits_are_disjoint_chapters():
    train, val = data.load_translation("train"), data.load_translation("validation")
    chapters = {s: {p.id.rsplit(".", 1)[0] for p in pairs} for s, pairs in (("train", train), ("val", val))}
    assert not chapters["train"] & chapters["val"]
    assert 0.03 < len(val) / (len(train) + len(val)) < 0.08, (len(train), len(val))
    ids = [p.id for p in train + val]
    assert len(ids) == len(set(ids))
    assert all(p.source and p.target and (p.source_lang, p.target_lang) == ("es", "en") for p in train + val)
    assert sum(path.stat().st_size for path in TRANSLATION_FILES.values()) < 6e6


def test_translation_text_is_clean():
    """No words glued by removed markup, no markup left, no lone quotation marks or pilcrows in the English."""
    for path in TRANSLATION_FILES.values():
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                for lang, text in record["translation"].items():
                    assert not re.search(r"[a-záéíóúñ][A-ZÁÉÍÓÚÑ]", text), (record["id"], lang, text)
                    assert "<" not in text and ">" not in text and text == " ".join(text.split())
                en = record["translation"]["en"]
                assert en.count("“") == en.count("”"), (record["id"], en)
                assert "¶" not in en, (record["id"], en)


def test_kjv_holds_out_the_validation_verses(build_data):
    """The KJV train file pairs the same Spanish verses with a second English reference: no verse
    (by reference) nor chapter of the validation split is in it, and its chapters are those the
    split's hash sends to train; where both references are kept, the Spanish side is the same."""
    web, val = data.load_translation("train"), data.load_translation("validation")
    kjv = data.load_translation("train", references=("kjv",))
    refs = [p.id.removesuffix("/kjv") for p in kjv]
    assert all(p.id.endswith("/kjv") for p in kjv) and len(refs) == len(set(refs))
    assert not set(refs) & {p.id for p in val}
    assert not {r.rsplit(".", 1)[0] for r in refs} & {p.id.rsplit(".", 1)[0] for p in val}
    assert not any(build_data.is_validation(r) for r in refs)
    source = {p.id: p.source for p in web}
    shared = [(r, p) for r, p in zip(refs, kjv) if r in source]
    assert len(shared) > 0.99 * len(kjv) and all(source[r] == p.source for r, p in shared)
    assert all(source[r] != p.target for r, p in shared[:100])  # the English is the KJV's, not the WEB's
    assert 1.9 < (len(web) + len(kjv)) / len(web) < 2.1, (len(web), len(kjv))


def test_references_option():
    seed = fresh_seed()
    web = data.load_translation("train")
    both = data.load_translation("train", references=("web", "kjv"))
    kjv = data.load_translation("train", references="kjv")
    assert both == web + kjv and data.load_translation("train", references=("web",)) == web
    assert len({p.id for p in both}) == len(both)
    tok = byte_tokenizer()
    n = random.Random(seed).randint(20, 60)
    samples = data.translation_samples(tok, n, split="train", seed=seed, references=("web", "kjv"),
                                       min_target_words=1, max_target_words=1000)
    shuffled = both.copy()
    random.Random(seed).shuffle(shuffled)
    assert [s.id for s in samples] == [p.id for p in shuffled[:n]], f"seed={seed}"
    for refs, split, match in [(("kjv",), "validation", "training pairs only"), (("web", "web"), "train", "distinct"),
                               (("nrsv",), "train", "distinct"), ((), "train", "distinct")]:
        with pytest.raises(ValueError, match=match):
            data.load_translation(split, references=refs)
    with pytest.raises(ValueError, match="bible-es-en' only"):
        data.load_translation("train", "iwslt2017-de-en", references=("web", "kjv"))


def test_open_ended_passages():
    texts = data.load_open_ended()
    assert len(texts) == 100 and len({t.id for t in texts}) == 100
    assert len({t.genre for t in texts}) == 15 and len({t.genre for t in texts[:15]}) == 15
    for t in texts:
        assert 150 <= len(t.text.split()) <= 170, (t.id, len(t.text.split()))
        assert re.search(r"[.?!][\"')]*$", t.text) and "/" not in t.text.replace("1/", ""), t.id
        assert not re.search(r" [,.;:?!]", t.text), (t.id, t.text)
        assert t.id in t.source and t.genre in t.source


# --------------------------------------------------------------------------------------------------
# Samples and positions with the byte tokenizer (exact decoding)


def test_translation_samples_target_start_byte_tokenizer(validation):
    seed = fresh_seed()
    rng = random.Random(seed)
    tok = byte_tokenizer()
    n = rng.randint(1, 40)
    lo = rng.randint(5, 30)
    hi = lo + rng.randint(0, 40)
    shuffle = rng.choice([None, seed])
    samples = data.translation_samples(tok, n, min_target_words=lo, max_target_words=hi, seed=shuffle)
    by_id = {p.id: p for p in validation}
    assert len(samples) == n, f"seed={seed}"
    for s in samples:
        pair = by_id[s.id]
        prefix, full = data.translation_prompt(pair)
        assert lo <= len(pair.target.split()) <= hi, f"seed={seed}"
        assert s.text == full and tok.decode(s.input_ids) == full, f"seed={seed}"
        assert tok.decode(s.input_ids[s.target_start:]) == pair.target, f"seed={seed} {s.id}"
        assert tok.decode(s.input_ids[: s.target_start]) == prefix + " ", f"seed={seed} {s.id}"
        assert prefix.endswith("Translated:") and f"Spanish sentence to English: {pair.source}\n---\n" in prefix
    if shuffle is None:  # file order: the first qualifying pairs
        expected = [p.id for p in validation if lo <= len(p.target.split()) <= hi][:n]
        assert [s.id for s in samples] == expected, f"seed={seed}"


def test_samples_are_deterministic():
    seed = fresh_seed()
    tok = byte_tokenizer()
    a = data.translation_samples(tok, 8, seed=seed)
    assert a == data.translation_samples(tok, 8, seed=seed), f"seed={seed}"
    assert data.translation_samples(tok, 8) == data.translation_samples(tok, 8)
    assert data.open_ended_samples(tok, 5) == data.open_ended_samples(tok, 5)


def test_open_ended_samples_byte_tokenizer():
    seed = fresh_seed()
    rng = random.Random(seed)
    tok = byte_tokenizer()
    n, n_tokens = rng.randint(1, 100), rng.randint(21, 1200)
    samples = data.open_ended_samples(tok, n, n_tokens=n_tokens)
    for s, t in zip(samples, data.load_open_ended()):
        assert s.id == t.id and s.task == "open-ended" and s.target_start == 0, f"seed={seed}"
        assert len(s.input_ids) == min(n_tokens, len(t.text.encode())), f"seed={seed}"
        assert t.text.startswith(s.text), f"seed={seed}"
        decoded = tok.decode(s.input_ids)
        if len(s.text.encode()) == len(s.input_ids):  # the cut falls between characters
            assert decoded == s.text, f"seed={seed}"
        else:  # the cut falls inside the last character, which the text keeps whole
            assert len(s.text[-1].encode()) > 1 and len(s.text[:-1].encode()) < len(s.input_ids), f"seed={seed}"
            assert decoded == s.text[:-1] + "\ufffd", f"seed={seed}"


def test_open_ended_samples_cut_inside_a_character():
    tok = byte_tokenizer()
    for item in data.load_open_ended():
        cut = next((i for i, ch in enumerate(item.text) if len(ch.encode()) > 1 and i >= 20), None)
        if cut is not None:
            break
    assert cut is not None, "no open-ended text has a multi-byte character to cut"
    n_tokens = len(item.text[:cut].encode()) + 1  # the first byte of that character
    [sample] = [s for s in data.open_ended_samples(tok, len(data.load_open_ended()), n_tokens=n_tokens)
                if s.id == item.id]
    assert sample.text == item.text[: cut + 1]
    assert tok.decode(sample.input_ids) == item.text[:cut] + "\ufffd"


def test_evaluation_targets_and_context_ends():
    seed = fresh_seed()
    rng = random.Random(seed)
    tok = byte_tokenizer()
    samples = data.translation_samples(tok, 5) + data.open_ended_samples(tok, 3, n_tokens=rng.randint(40, 300))
    for s in samples:
        last = rng.randint(1, 30)
        targets = data.evaluation_targets(s, last)
        n = len(s.input_ids)
        assert list(targets) == list(range(n - last, n)), f"seed={seed}"
        assert all(s.target_start <= j < n for j in targets), f"seed={seed}"
        for depth in (1, 2, 3):
            assert data.context_ends(s, depth, last) == [j - depth for j in targets], f"seed={seed}"
    short = data.Sample("x", "translation", list(range(30)), 25, "")
    with pytest.raises(ValueError, match="5 target tokens"):
        data.evaluation_targets(short, 20)
    with pytest.raises(ValueError, match="depth"):
        data.context_ends(short, 0, 5)
    assert list(data.evaluation_targets(short, 5)) == [25, 26, 27, 28, 29]


# --------------------------------------------------------------------------------------------------
# Real tokenizers: BOS (Gemma) and a space merged into the first target token (both)


@pytest.mark.parametrize("alias,adds_bos", [("smollm2-135m", False), ("gemma3-270m", True)])
def test_real_tokenizers(alias, adds_bos):
    from mtp_lib.models import ModelUnavailableError, load_model

    try:
        tok = load_model(alias, device="cpu").tokenizer
    except (ModelUnavailableError, ImportError) as err:
        pytest.skip(f"{alias} not available: {err}")
    seed = fresh_seed()
    samples = data.translation_samples(tok, 10, seed=seed)
    by_id = {p.id: p for p in data.load_translation("validation")}
    for s in samples:
        assert (s.input_ids[0] == tok.bos_token_id) == adds_bos, f"seed={seed}"
        target = by_id[s.id].target
        decoded = tok.decode(s.input_ids[s.target_start:])
        assert decoded.lstrip() == target, f"seed={seed} {s.id}: {decoded!r}"
        before = tok.decode(s.input_ids[: s.target_start], skip_special_tokens=True)
        assert before.rstrip().endswith("Translated:"), f"seed={seed} {s.id}: {before[-30:]!r}"
        assert all(s.target_start <= j for j in data.evaluation_targets(s)), f"seed={seed}"
    for s in data.open_ended_samples(tok, 10):
        assert s.target_start == (1 if adds_bos else 0) and len(s.input_ids) <= 200
        assert tok.decode(s.input_ids[s.target_start:]) == s.text


# --------------------------------------------------------------------------------------------------
# Errors


def test_bad_inputs(tmp_path, monkeypatch):
    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="bible-es-en"):
        data.load_translation("validation", dataset="wmt14")
    with pytest.raises(ValueError, match="'train', 'validation'"):
        data.load_translation("dev")
    with pytest.raises(ValueError, match="only .* pairs"):
        data.translation_samples(tok, 10**6)
    with pytest.raises(ValueError, match="max_target_words"):
        data.translation_samples(tok, 1, min_target_words=30, max_target_words=20)
    with pytest.raises(ValueError, match="positive integer"):
        data.translation_samples(tok, 0)
    with pytest.raises(ValueError, match="only 100"):
        data.open_ended_samples(tok, 101)
    pair = data.Pair("x", "hola", "hello", "es", "en")
    with pytest.raises(ValueError, match="end with {target}"):
        data.translation_prompt(pair, "{target} from {source}")
    with pytest.raises(ValueError, match="LANGUAGE_NAMES"):
        data.translation_prompt(data.Pair("x", "a", "b", "xx", "en"))
    monkeypatch.setenv("MTP_DATA_DIR", str(tmp_path))
    assert data.data_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match=r"validation\.jsonl\.gz.*python scripts/build_data\.py"):
        data.load_translation("validation")
    with pytest.raises(FileNotFoundError, match=r"brown-passages\.jsonl\.gz.*python scripts/build_data\.py"):
        data.load_open_ended()


# --------------------------------------------------------------------------------------------------
# The IWSLT path: same record conversion, datasets.load_dataset patched (no network here)

GERMAN = [("Das ist gut.", "That is good."), ("  Wir  sehen uns. ", "See you."), ("", "dropped"),
          ("Und es ist egal, wie viele Informationen wir uns ansehen.", "And it doesn't matter how much information we're looking at.")]


def test_pairs_from_datasets_records():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"translation": {"de": de, "en": en}} for de, en in GERMAN])
    pairs = data.pairs_from_records(ds, "de", "en", id_prefix="iwslt/")
    assert [p.id for p in pairs] == ["iwslt/0", "iwslt/1", "iwslt/3"]
    assert pairs[1] == data.Pair("iwslt/1", "Wir sehen uns.", "See you.", "de", "en")
    with pytest.raises(ValueError, match="no 'fr' text"):
        data.pairs_from_records(ds, "fr", "en")
    ours = json.loads(gzip.open(TRANSLATION_FILES["validation"], "rt", encoding="utf-8").readline())
    assert data.pairs_from_records([ours], "es", "en")[0] == data.load_translation("validation")[0]


def test_iwslt_branch(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        if path != "parquet":  # what datasets >= 4 says about the hub's loading script
            raise RuntimeError("Dataset scripts are no longer supported, but found iwslt2017.py")
        assert split in kwargs["data_files"] and "iwslt2017-de-en" in kwargs["data_files"][split]
        return datasets.Dataset.from_list([{"translation": {"de": de, "en": en}} for de, en in GERMAN * 10])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    pairs = data.load_translation("validation", dataset="iwslt2017-de-en")
    assert calls[0] == ("IWSLT/iwslt2017", "iwslt2017-de-en", "validation") and calls[1][0] == "parquet"
    assert len(pairs) == 30 and pairs[0].id == "iwslt2017-de-en/validation/0"
    tok = byte_tokenizer()
    samples = data.translation_samples(tok, 10, dataset="iwslt2017-de-en", min_target_words=5)
    assert all(s.text.startswith("Translate the following German sentence to English: Und es ist") for s in samples)
    assert all(tok.decode(s.input_ids[s.target_start:]) == GERMAN[3][1] for s in samples)
    with pytest.raises(ValueError, match="'test'"):
        data.load_translation("dev", dataset="iwslt2017-de-en")


# --------------------------------------------------------------------------------------------------
# scripts/build_data.py helpers


def test_strip_osis_never_glues_words(build_data):
    """Random words wrapped in random OSIS markup come back as the same words, one space apart.

    Removed elements other than word wrappers separate words even without whitespace around them;
    two ``<w>`` elements (or a ``<w>`` and bare text) with nothing between them are one word, so the
    generator always puts a space there.
    """
    seed = fresh_seed()
    rng = random.Random(seed)
    vocab = ["God", "created", "the", "heavens", "and", "earth", "Yahweh’s", "Spirit", "día", "Jehová"]
    words = [rng.choice(vocab) for _ in range(rng.randint(1, 30))]
    pieces: list[str] = []
    for i, word in enumerate(words):
        piece = rng.choice([
            f'<w lemma="strong:H0430">{word}</w>',
            f'{word}<note placement="foot"><reference>1:1 </reference>Or, {rng.choice(vocab)}</note>',
            f'<l level="1" sID="x{i}"/>{word}<l eID="x{i}" level="1"/>',
            f'<div type="x-milestone" subType="x-preverse" sID="pv{i}"/>{word}',
            f'<transChange type="added">{word}</transChange>',
        ])
        if pieces:
            word_to_word = pieces[-1].endswith("</w>") and not piece.startswith(("<l ", "<div", "<transChange"))
            bare_end = not pieces[-1].endswith(">")
            pieces.append(" " if word_to_word or bare_end else rng.choice([" ", "", "\n"]))
        pieces.append(piece)
    osis = "".join(pieces)
    assert build_data.strip_osis(osis) == " ".join(words), f"seed={seed}: {osis}"


def test_strip_osis_examples(build_data):
    strip = build_data.strip_osis
    web = ('<w lemma="strong:H0430">God</w><note placement="foot"><reference type="annotateRef">1:1 </reference>'
           'The Hebrew word rendered “God” is “אֱלֹהִ֑ים” (Elohim).</note><w lemma="strong:H1254">created</w> ')
    assert strip(web) == "God created"
    assert strip("<w>God’s</w><note>n</note>, <w>house</w>") == "God’s, house"
    assert strip('<title canonical="true" type="psalm">A Psalm by David.</title> <l sID="a"/>Yahweh') == \
        "A Psalm by David. Yahweh"
    assert strip('<speaker>Beloved</speaker> <l sID="a"/>I slept') == "I slept"
    assert strip('Amen. <div canonical="true" eID="g" osisID="Rev" type="book"/> <title>Glossary</title>') == "Amen."
    rv = '<w>hay allí</w><transChange type="added">también</transChange><w>bdelio</w>'
    assert strip(rv) == "hay allí también bdelio"
    assert strip('<w>sáca</w><transChange type="added">lo</transChange> <w>de</w>') == "sácalo de"
    assert strip('<w>Y</w><transChange type="added">la</transChange> <w>casa</w>') == "Y la casa"


def test_kjv_clean_up(build_data):
    verses = {"Gen.2.4": "¶ These are the generations", "Gen.2.5": "every plant ¶ of the field", "Gen.1.1": "In the"}
    assert build_data.strip_pilcrows(verses) == 2
    assert verses == {"Gen.2.4": "These are the generations", "Gen.2.5": "every plant of the field", "Gen.1.1": "In the"}
    # an added English word after a word that would take a Spanish enclitic (-d) stays a word of its own
    osis = '<w>heard</w><transChange type="added">me</transChange> <w>not</w>'
    assert build_data.strip_osis(osis, enclitics=False) == "heard me not"
    assert build_data.strip_osis(osis) == "heardme not"  # the Spanish rule, which the KJV must not get


def test_balance_quotes(build_data):
    balance = build_data.balance_quotes
    assert balance("God said, “Let there be light;") == "God said, Let there be light;"
    assert balance("and it was so.” He said") == "and it was so. He said"
    assert balance("“‘“In that day they will go.”") == "“In that day they will go.”"
    assert balance("lest you die.’”") == "lest you die."
    assert balance("He said, “Don’t say ‘no.’ Go.”") == "He said, “Don’t say ‘no.’ Go.”"
    assert balance("the servants’ houses") == "the servants’ houses"


def test_brown_detokenize(build_data):
    def prose(tagged: str) -> str:
        return build_data.detokenize(build_data.clean_brown_tokens([t.rpartition("/")[0] for t in tagged.split()]))

    assert prose("``/`` Why/wrb ,/, Winston/np ''/'' ,/, she'd/pps+md cry/vb ./.") == '"Why, Winston," she\'d cry.'
    assert prose("--/-- Nick/np said/vbd (/( twice/rb )/) ?/. ?/.") == "Nick said (twice)?"
    assert prose("staff/nn --/-- Jerry/np in/in Troy/np ,/, N./np Y./np ./.") == "staff—Jerry in Troy, N. Y."
    assert prose("the/at jar/nn ''/'' !/. !/.") == 'the jar!"'
    text = "\n\n\tA/at b/nn ./.\nC/np d/nn ./.\n\n\n\tHeadline/nn-hl \n\n\n\tE/np f/nn ./.\n"
    assert build_data.brown_sections(text) == [[["A b.", "C d."]], [["E f."]]]
