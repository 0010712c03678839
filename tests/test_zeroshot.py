"""Zero-shot evaluation: the loaders on fixture files in each task's exact format, lm-eval's tokenization and
rolling-window rules, batched scores against brute-force forwards of tiny random models, the metrics, the recovery
math, the table, the plot and the errors."""

from __future__ import annotations

import json
import lzma
import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import teacher_config, tiny_gsa_model, tiny_tokenizer

from t2r.errors import T2RError
from t2r.eval import loglikelihood as lik
from t2r.eval import tasks
from t2r.eval import zeroshot as zs

# ------------------------------------------------------------------------------------------------- fixtures
LAMBADA = [
    {"text": "The cat sat on the mat and looked at the door. Then it walked to the door"},
    {"text": "She opened the book, read one page and closed the book"},
    {"text": "He said  hello twice\nand then he said goodbye"},  # a double space and a newline inside
    {"text": "Numbers like 42 are fine too, said the teacher to the class of 42"},
]
PIQA = [
    {"goal": "How do you open a jar?", "sol1": "Twist the lid.", "sol2": "Freeze the jar.", "label": 0},
    {"goal": "To dry wet shoes,", "sol1": "put them in water", "sol2": "stuff them with paper", "label": 1},
    {"goal": "Make tea", "sol1": "Boil water and add a tea bag.", "sol2": "Add sand.", "label": 0},
]
ARC_EASY = [
    {
        "id": "q1",
        "question": "Which object is a source of light?",
        "choices": {"text": ["a rock", "the sun", "a spoon", "a cup"], "label": ["A", "B", "C", "D"]},
        "answerKey": "B",
    },
    {
        "id": "q2",
        "question": "What do plants need to grow?",
        "choices": {"text": ["water", "plastic", "iron"], "label": ["1", "2", "3"]},
        "answerKey": "1",
    },
    {
        "id": "q3",
        "question": "Which is a liquid at room temperature?",
        "choices": {"text": ["ice", "steam", "wood", "salt", "water"], "label": ["A", "B", "C", "D", "E"]},
        "answerKey": "E",
    },
]
ARC_CHALLENGE = [
    {
        "id": "c1",
        "question": "Why does the moon shine?",
        "choices": {"text": ["It burns", "It reflects light", "It is hot", "It glows"], "label": ["1", "2", "3", "4"]},
        "answerKey": "2",
    },
    {
        "id": "c2",
        "question": "What is the boiling point of water at sea level?",
        "choices": {"text": ["50 C", "100 C", "150 C", "0 C"], "label": ["A", "B", "C", "D"]},
        "answerKey": "B",
    },
]
WINOGRANDE = [
    {
        "sentence": "The trophy does not fit in the suitcase because _ is too big.",
        "option1": "trophy",
        "option2": "suitcase",
        "answer": "1",
    },
    {
        "sentence": "Sarah lent Maria a book because _ had finished reading it.",
        "option1": "Sarah",
        "option2": "Maria",
        "answer": "1",
    },
    {
        "sentence": "The pan was hotter than the pot, so _ burned my hand.",
        "option1": "the pan",
        "option2": "the pot",
        "answer": "2",
    },
]
WIKITEXT = (
    " \n = Alpha Article = \n \n Alpha is a test article . It has numbers like 1 @,@ 000 and a well @-@ known "
    "phrase ( with brackets ) . The 1990 s ' music was loud ; nobody minded , said the author . \n \n"
    ' = = Section one = = \n \n More text about alpha , with " quotes " and the value 3 @.@ 5 . It goes on and on '
    "so that the article is longer than one window of the model , which is the point of this test . \n \n"
    " = Beta Article = \n \n Beta is short . \n \n = Gamma Article = \n \n Gamma has a list : one , two ! \n \n"
)
HELLASWAG_HUB = [
    {
        "ind": 4,
        "activity_label": "Removing ice from car",
        "ctx_a": "Then, the man writes over the snow.",
        "ctx_b": "then HE uses a brush",
        "ctx": "unused",
        "endings": ["to clear it. [title] Done.", "and stops.", "to  dance.", "[header] then sits."],
        "source_id": "x",
        "split": "val",
        "split_type": "indomain",
        "label": "0",
    },
]
MMLU_HUB = [
    {"question": " What is 2+2? ", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1},
    {"question": "What is 3+3?", "subject": "elementary_mathematics", "choices": ["6", "7", "8", "9"], "answer": 0},
    {
        "question": "Largest planet?",
        "subject": "astronomy",
        "choices": ["Mars", "Jupiter", "Venus", "Earth"],
        "answer": 1,
    },
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and one thread keeps these tests fast on a busy two-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_xz(path, text: str) -> None:
    with lzma.open(path, "wt", encoding="utf-8") as f:
        f.write(text)


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_data")
    write_xz(root / "lambada_openai_test.jsonl.xz", jsonl(LAMBADA))
    write_xz(root / "piqa_valid.jsonl.xz", jsonl(PIQA))
    write_xz(root / "arc_easy_test.jsonl.xz", jsonl(ARC_EASY))
    write_xz(root / "arc_challenge_test.jsonl.xz", jsonl(ARC_CHALLENGE))
    write_xz(root / "winogrande_dev.jsonl.xz", jsonl(WINOGRANDE))
    write_xz(root / "wikitext2_test_raw.txt.xz", WIKITEXT)
    write_xz(root / "hellaswag_validation.jsonl.xz", jsonl([tasks._hub_hellaswag(r) for r in HELLASWAG_HUB]))
    write_xz(root / "mmlu_test.jsonl.xz", jsonl(MMLU_HUB))
    return root


def bpe_tokenizer(bos: bool = False, vocab_size: int = 320):
    """A byte-level BPE with real merges (" the", " a", ...), optionally adding BOS like Llama's tokenizers."""
    return tiny_tokenizer(vocab_size=vocab_size, bos=bos, alphabet=256, chars=40_000)


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def models(tok):
    """A tiny GSA student and a tiny Llama teacher over the tokenizer's vocabulary."""
    from transformers import AutoModelForCausalLM

    student = tiny_gsa_model("llama", seed=0, teacher_overrides={"vocab_size": len(tok)})
    torch.manual_seed(1)
    teacher = AutoModelForCausalLM.from_config(teacher_config("llama", vocab_size=len(tok))).eval()
    return {"student": student, "teacher": teacher}


# -------------------------------------------------------------------------------------------------- loaders
def test_loaders_read_each_format(data_dir):
    lambada = tasks.load_task("lambada", data_dir)
    assert [r["text"] for r in lambada.records] == [r["text"] for r in LAMBADA]
    assert lambada.main_metric == "acc" and lambada.metrics == ("acc", "ppl")
    # LAMBADA splits on single spaces: the double space and the newline stay in the context.
    assert tasks.lambada_pair(LAMBADA[2]) == ("He said  hello twice\nand then he said", " goodbye")

    piqa = tasks.load_task("piqa", data_dir, limit=2)
    assert len(piqa.records) == 2 and piqa.source.endswith("piqa_valid.jsonl.xz")
    doc = tasks.CHOICE_DOCS["piqa"](piqa.records[1])
    assert doc.contexts == ("Question: To dry wet shoes,\nAnswer:",) * 2
    assert doc.continuations == (" put them in water", " stuff them with paper") and doc.gold == 1
    assert doc.choices == ("put them in water", "stuff them with paper")

    arc = [tasks.CHOICE_DOCS["arc_easy"](r) for r in tasks.load_task("arc_easy", data_dir).records]
    assert [d.gold for d in arc] == [1, 0, 4]  # "B", "1" among "1".."3", "E" among five
    assert arc[1].contexts[0] == "Question: What do plants need to grow?\nAnswer:"
    assert arc[1].continuations == (" water", " plastic", " iron")
    challenge = tasks.load_task("arc_challenge", data_dir)
    assert challenge.main_metric == "acc_norm"
    assert [tasks.CHOICE_DOCS["arc_challenge"](r).gold for r in challenge.records] == [1, 1]

    wino = tasks.CHOICE_DOCS["winogrande"](tasks.load_task("winogrande", data_dir).records[2])
    assert wino.contexts == (
        "The pan was hotter than the pot, so the pan",
        "The pan was hotter than the pot, so the pot",
    )
    assert wino.continuations == (" burned my hand.",) * 2 and wino.gold == 1

    pages = [r["page"] for r in tasks.load_task("wikitext2", data_dir).records]
    assert len(pages) == 3 and pages[0].startswith(" = Alpha Article = \n")
    assert " = = Section one = = " in pages[0]  # level-2 headings do not start a page
    assert pages[-1].endswith(" \n")  # the last page keeps the file's final empty line
    assert len(tasks.load_task("wikitext2", data_dir, limit=1).records) == 1


def test_hub_layout_tasks_build_lm_eval_prompts(data_dir):
    hella = tasks.CHOICE_DOCS["hellaswag"](tasks.load_task("hellaswag", data_dir).records[0])
    # ctx_b.capitalize() lowercases the rest; " [title]" -> ". "; [tags] dropped; one pass of "  " -> " ".
    assert hella.contexts[0] == "Removing ice from car: Then, the man writes over the snow. Then he uses a brush"
    assert hella.choices == ("to clear it.. Done.", "and stops.", "to dance.", " then sits.")  # stripped first
    assert hella.continuations[0] == " to clear it.. Done." and hella.gold == 0

    mmlu = tasks.load_task("mmlu", data_dir)
    doc = tasks.CHOICE_DOCS["mmlu"](mmlu.records[0])
    assert doc.contexts[0] == (
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    )
    assert doc.continuations == (" A", " B", " C", " D") and doc.choices == ("A", "B", "C", "D") and doc.gold == 1
    # --limit applies per subject, as lm-eval's mmlu group does.
    assert [r["subject"] for r in tasks.load_task("mmlu", data_dir, limit=1).records] == [
        "elementary_mathematics",
        "astronomy",
    ]


def test_hub_loader_maps_fields_and_falls_back(tmp_path, monkeypatch):
    calls = []

    def fake_rows(dataset, config, split):
        calls.append((dataset, config, split))
        if dataset == "baber/piqa":
            raise ConnectionError("offline")
        rows = {"ybisk/piqa": PIQA, "Rowan/hellaswag": HELLASWAG_HUB, "cais/mmlu": MMLU_HUB}
        rows["EleutherAI/wikitext_document_level"] = [{"page": "a b"}, {"page": "c"}]
        return [dict(r) for r in rows[dataset]]

    monkeypatch.setattr(tasks, "_hub_rows", fake_rows)
    piqa = tasks.load_task("piqa", tmp_path)
    assert calls[:2] == [("baber/piqa", None, "validation"), ("ybisk/piqa", None, "validation")]
    assert piqa.records == PIQA and piqa.source.startswith("hub:ybisk/piqa")
    hella = tasks.load_task("hellaswag", tmp_path)
    assert hella.records[0]["label"] == 0 and set(hella.records[0]) == {
        "activity_label",
        "ctx_a",
        "ctx_b",
        "endings",
        "label",
    }
    assert tasks.load_task("wikitext2", tmp_path, limit=1).records == [{"page": "a b"}]
    assert len(tasks.load_task("mmlu", tmp_path).records) == 3


def test_missing_data_is_a_one_line_error(tmp_path, monkeypatch):
    def offline(dataset, config, split):
        raise ConnectionError("cannot reach the hub\nsecond line of detail")

    monkeypatch.setattr(tasks, "_hub_rows", offline)
    with pytest.raises(T2RError) as exc:
        tasks.load_task("winogrande", tmp_path)
    message = str(exc.value)
    assert "\n" not in message and "winogrande" in message and "winogrande_dev.jsonl.xz" in message
    assert "allenai/winogrande" in message

    monkeypatch.delenv("T2R_EVAL_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # no ../shared/data/eval from here
    assert tasks.default_data_dir() is None
    with pytest.raises(T2RError, match="T2R_EVAL_DATA"):
        tasks.load_task("piqa")
    with pytest.raises(T2RError, match="unknown zero-shot task"):
        tasks.load_task("boolq", tmp_path)


def test_default_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("T2R_EVAL_DATA", str(tmp_path / "elsewhere"))
    assert tasks.default_data_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("T2R_EVAL_DATA")
    (tmp_path / "shared" / "data" / "eval").mkdir(parents=True)
    (tmp_path / "checkout").mkdir()
    monkeypatch.chdir(tmp_path / "checkout")
    assert tasks.default_data_dir().resolve() == (tmp_path / "shared" / "data" / "eval").resolve()


def test_wikitext_words_and_detokenizer():
    page = " = Alpha = \n \n A well @-@ known ( odd ) phrase , 1 @,@ 000 . \n"
    # lm-eval counts re.split pieces on the original page: the leading and trailing whitespace add one each.
    assert tasks.count_words(page) == len(page.split()) + 2
    assert tasks.wikitext_detokenize(page) == " = Alpha =\n\nA well-known (odd) phrase, 1,000.\n"
    assert tasks.wikitext_detokenize(" = = Sub = = \n") == " == Sub ==\n"
    assert tasks.wikitext_detokenize("the 1990 s ' music") == "the 1990 s' music"


# ----------------------------------------------------------------------------------------------- tokenization
@pytest.mark.parametrize("bos", [False, True])
def test_pair_tokenization_follows_lm_eval(bos):
    tok = bpe_tokenizer(bos=bos)
    enc = lik.PairEncoder(tok)
    ids = lambda s, special=True: tok(s, add_special_tokens=special)["input_ids"]  # noqa: E731
    head = [1] if bos else []

    # Trailing whitespace of the context moves to the continuation, then the whole string is split.
    (ctx, cont), (ctx2, cont2) = enc.encode_pairs([("Answer: ", "the"), ("Answer:\n \t", "the")])
    assert ctx == ids("Answer:") and cont == ids("Answer: the")[len(ctx) :] == ids(" the", False)
    assert ctx2 == ids("Answer:") and cont2 == ids("Answer:\n \tthe")[len(ctx2) :]
    assert ctx[: len(head)] == head and cont[0] != tok.bos_token_id  # any BOS belongs to the context only
    naive_ctx = ids("Answer: ")
    assert ids("Answer: the")[len(naive_ctx) :] != cont  # encoding the context as given would split " the"

    # The continuation is the whole string's tokens after the context's token count, also where a token merges
    # across the boundary.
    (ctx, cont), _ = enc.encode_pairs([("in", "to the"), ("x", "y")])
    assert ctx == ids("in") and cont == ids("into the")[len(ctx) :]

    # An empty context becomes the prefix token (BOS here) and the continuation has no special tokens.
    [(ctx, cont)] = enc.encode_pairs([("", " the end")])
    assert ctx == [tok.bos_token_id] and cont == ids(" the end", False)

    # A string that already starts with the BOS text gets no second BOS.
    assert enc.encode(["<s> the"])[0] == ids("<s> the", False)


def test_rolling_windows_cover_every_token_once():
    prefix = -1
    for n in range(1, 30):
        tokens = list(range(100, 100 + n))
        for length in (1, 2, 3, 5, 8, 40):
            windows = lik.rolling_windows(tokens, prefix, length)
            assert [t for _, cont in windows for t in cont] == tokens  # every token once, in order
            stream = [prefix, *tokens]
            for i, (ctx, cont) in enumerate(windows):
                assert 1 <= len(cont) <= length and ctx
                inp = (ctx + cont)[-(length + 1) :][:-1]
                assert len(inp) <= length
                end = stream.index(cont[-1])
                assert ctx + cont == stream[end + 1 - len(ctx + cont) : end + 1]  # contiguous, true history
                if i == len(windows) - 1 and n > length:
                    assert len(inp) == length  # the last window gets a full context
            assert len(windows) == math.ceil(n / length)
    assert lik.rolling_windows([], prefix, 4) == []


# --------------------------------------------------------------------------------------------- brute force
def brute_force_pair(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """One plain forward over the whole string; no batching, no padding, no kept-logits trick."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    target = torch.tensor(whole[len(ctx) :])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole[:-1]]), use_cache=False).logits[0].double()
    scored = logits[len(ctx) - 1 :]
    logprob = F.log_softmax(scored, dim=-1).gather(1, target[:, None])[:, 0]
    return logprob.sum().item(), bool((scored.argmax(-1) == target).all())


MC_TASKS = ["piqa", "arc_easy", "arc_challenge", "winogrande", "hellaswag", "mmlu"]


@pytest.mark.parametrize("name", MC_TASKS)
def test_multiple_choice_matches_brute_force(models, tok, data_dir, name):
    task = tasks.load_task(name, data_dir)
    for model in models.values():
        score = zs.score_task(model, tok, task, batch_size=3)
        docs = [tasks.CHOICE_DOCS[name](r) for r in task.records]
        brute = [
            [brute_force_pair(model, tok, c, k)[0] for c, k in zip(d.contexts, d.continuations, strict=True)]
            for d in docs
        ]
        ours = score.details["loglikelihoods"]
        assert max(abs(a - b) for x, y in zip(ours, brute, strict=True) for a, b in zip(x, y, strict=True)) < 1e-4
        pred = [max(range(len(ll)), key=ll.__getitem__) for ll in brute]
        norm = [[v / len(c) for v, c in zip(ll, d.choices, strict=True)] for ll, d in zip(brute, docs, strict=True)]
        pred_norm = [max(range(len(ll)), key=ll.__getitem__) for ll in norm]
        assert score.details["pred"] == pred and score.details["pred_norm"] == pred_norm
        gold = [d.gold for d in docs]
        assert score.metrics["acc"] == pytest.approx(sum(p == g for p, g in zip(pred, gold, strict=True)) / len(docs))
        if "acc_norm" in task.metrics:
            assert score.metrics["acc_norm"] == pytest.approx(
                sum(p == g for p, g in zip(pred_norm, gold, strict=True)) / len(docs)
            )
        assert score.n == len(task.records)


def test_acc_norm_divides_by_characters_and_ties_go_to_the_first():
    """lm-eval's acc_norm divides by len(choice) in characters (bytes would be acc_bytes); argmax takes the first."""
    doc = tasks.ChoiceDoc(("q",) * 2, (" \u00e9", " ab"), ("\u00e9", "ab"), gold=1)  # é: 1 character, 2 bytes
    metrics, details = zs._mc_metrics([doc], [[-1.5, -2.5]], ("acc", "acc_norm"))
    assert details["pred"] == [0] and details["pred_norm"] == [1]  # -1.5/1 < -2.5/2; by bytes it would be 0
    assert metrics == {"acc": 0.0, "acc_norm": 1.0}
    _, tied = zs._mc_metrics([doc], [[-2.0, -2.0]], ("acc",))
    assert tied["pred"] == [0]


def test_lambada_matches_brute_force(models, tok, data_dir):
    task = tasks.load_task("lambada", data_dir)
    for model in models.values():
        score = zs.score_task(model, tok, task, batch_size=2)
        brute = [brute_force_pair(model, tok, *tasks.lambada_pair(r)) for r in task.records]
        assert score.details["greedy"] == [g for _, g in brute]
        assert max(abs(a - b) for a, (b, _) in zip(score.details["loglikelihoods"], brute, strict=True)) < 1e-4
        assert score.metrics["ppl"] == pytest.approx(math.exp(-sum(b for b, _ in brute) / len(brute)), rel=1e-5)
        assert score.metrics["acc"] == sum(g for _, g in brute) / len(brute)


def test_greedy_flag_is_true_for_the_models_own_argmax(models, tok):
    """A continuation made of the model's own greedy tokens must score is_greedy; change one token and it must not."""
    model = models["teacher"]
    ctx = tok("The value of")["input_ids"]
    seq = list(ctx)
    with torch.no_grad():
        for _ in range(4):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    cont = seq[len(ctx) :]
    wrong = [*cont[:-1], (cont[-1] + 1) % len(tok)]
    (ll, greedy), (ll_wrong, greedy_wrong) = lik.score_token_requests(
        model, [(ctx, cont), (ctx, wrong)], max_length=64, progress=False
    )
    assert greedy and not greedy_wrong and ll > ll_wrong


def test_batching_and_padding_do_not_change_scores(models, tok, data_dir):
    enc = lik.PairEncoder(tok)
    docs = [
        tasks.CHOICE_DOCS[n](r)
        for n in ("piqa", "arc_easy", "winogrande")
        for r in tasks.load_task(n, data_dir).records
    ]
    pairs = [p for d in docs for p in zip(d.contexts, d.continuations, strict=True)]
    pairs += [tasks.lambada_pair(r) for r in LAMBADA]
    requests = enc.encode_pairs(pairs)
    assert len({len(c) + len(k) for c, k in requests}) > 5  # lengths differ, so batches are padded

    class NoKeep(torch.nn.Module):  # a model whose forward knows no logits_to_keep: full logits are sliced
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, use_cache=False):
            return self.inner(input_ids=input_ids, use_cache=use_cache)

    for model in models.values():
        one = lik.score_token_requests(model, requests, max_length=512, batch_size=1, progress=False)
        seven = lik.score_token_requests(model, requests, max_length=512, batch_size=7, progress=False)
        full = lik.score_token_requests(NoKeep(model), requests, max_length=512, batch_size=7, progress=False)
        for (a, ga), (b, gb), (c, gc) in zip(one, seven, full, strict=True):
            assert abs(a - b) < 1e-5 and abs(a - c) < 1e-5 and ga == gb == gc


def test_left_truncation_keeps_the_last_tokens(models, tok):
    """A request longer than max_length is scored on its last max_length + 1 tokens, as lm-eval truncates."""
    model = models["teacher"]
    ctx, cont = list(range(10, 40)), [50, 51, 52]
    [(ll, _)] = lik.score_token_requests(model, [(ctx, cont)], max_length=8, progress=False)
    [(ll_short, _)] = lik.score_token_requests(model, [((ctx + cont)[-9:-3], cont)], max_length=64, progress=False)
    assert ll == pytest.approx(ll_short, abs=1e-6)


def brute_force_rolling(model, tokens: list[int], prefix: int, length: int) -> float:
    """Disjoint windows of ``length`` predicted tokens, each from scratch; the last one re-reads as much history as
    fits. Each window is one plain forward."""
    total, done, n = 0.0, 0, len(tokens)
    stream = [prefix, *tokens]  # stream[i] precedes tokens[i]
    while done < n:
        end = min(done + length, n)
        start = max(0, end - length)  # the input: stream[start:end], `length` tokens (fewer at the start)
        inp = torch.tensor([stream[start:end]])
        with torch.no_grad():
            logits = model(input_ids=inp, use_cache=False).logits[0].double()
        logprob = F.log_softmax(logits, dim=-1)
        for i in range(done, end):
            total += logprob[i - start, tokens[i]].item()
        done = end
    return total


def test_rolling_word_perplexity_matches_brute_force(models, tok, data_dir):
    task = tasks.load_task("wikitext2", data_dir)
    length = 24
    texts = [tasks.wikitext_detokenize(r["page"]) for r in task.records]
    lengths = [len(tok(t)["input_ids"]) for t in texts]
    assert max(lengths) > 3 * length  # the first article spans several windows
    for model in models.values():
        score = zs.score_task(model, tok, task, batch_size=4, max_length=length)
        brute = [brute_force_rolling(model, tok(t)["input_ids"], tok.bos_token_id, length) for t in texts]
        assert score.details["loglikelihoods"] == pytest.approx(brute, abs=1e-4)
        words = sum(len(re.split(r"\s+", r["page"])) for r in task.records)
        nbytes = sum(len(r["page"].encode()) for r in task.records)
        assert score.metrics["word_perplexity"] == pytest.approx(math.exp(-sum(brute) / words), rel=1e-5)
        assert score.metrics["byte_perplexity"] == pytest.approx(math.exp(-sum(brute) / nbytes), rel=1e-5)
        assert score.metrics["bits_per_byte"] == pytest.approx(-sum(brute) / nbytes / math.log(2), rel=1e-5)
        # With room for the whole article, one forward from the prefix token scores it.
        long = zs.score_task(model, tok, task, max_length=4096)
        one = [brute_force_rolling(model, tok(t)["input_ids"], tok.bos_token_id, 4096) for t in texts]
        assert long.details["loglikelihoods"] == pytest.approx(one, abs=1e-4)


# ----------------------------------------------------------------------------------------- results, recovery
def fake_result(models=("student", "teacher")) -> dict:
    values = {
        "lambada": ("acc", {"student": {"acc": 0.2, "ppl": 50.0}, "teacher": {"acc": 0.4, "ppl": 25.0}}),
        "piqa": ("acc", {"student": {"acc": 0.6, "acc_norm": 0.5}, "teacher": {"acc": 0.75, "acc_norm": 0.5}}),
        "arc_challenge": (
            "acc_norm",
            {"student": {"acc": 0.2, "acc_norm": 0.3}, "teacher": {"acc": 0.3, "acc_norm": 0.4}},
        ),
        "wikitext2": ("word_perplexity", {"student": {"word_perplexity": 30.0}, "teacher": {"word_perplexity": 20.0}}),
    }  # fmt: skip
    entries = {}
    for name, (main, scores) in values.items():
        metrics = list(scores["teacher"])
        entries[name] = {"main_metric": main, "metrics": metrics, "n": 10,
                       "scores": {m: {**scores[m], "n": 10} for m in models}}  # fmt: skip
    result = {"models": list(models), "tasks": entries}
    rec = zs.recovery(result)
    if rec:
        result["recovery"] = rec
    return result


def test_recovery_math_and_table():
    result = fake_result()
    rec = result["recovery"]["models"]["student"]
    assert result["recovery"]["reference"] == "teacher"
    assert rec["tasks"]["piqa"] == {"metric": "acc", "ratio": pytest.approx(0.8)}
    assert rec["tasks"]["arc_challenge"]["ratio"] == pytest.approx(0.75)  # its main metric, acc_norm
    assert rec["tasks"]["wikitext2"]["ratio"] == pytest.approx(20 / 30)  # teacher/student for perplexities
    # The average takes accuracy tasks only; perplexities are reported apart (LAMBADA's ppl among them).
    assert rec["average"] == pytest.approx((0.5 + 0.8 + 0.75) / 3)
    assert rec["average_over"] == ["lambada", "piqa", "arc_challenge"]
    assert rec["perplexity"] == {"lambada/ppl": pytest.approx(0.5), "wikitext2/word_perplexity": pytest.approx(2 / 3)}
    json.dumps(result)

    table = zs.format_table(result)
    assert "student/teacher" in table and "80.0%" in table and "66.7%" in table
    assert "average recovery 68.3%" in table
    piqa_row = next(line for line in table.splitlines() if line.startswith("piqa") and "acc*" in line)
    assert "60.00" in piqa_row and "75.00" in piqa_row

    alone = fake_result(models=("teacher",))
    assert "recovery" not in alone and zs.recovery(alone) is None
    assert "/" not in zs.format_table(alone).splitlines()[0]


def test_plot_recovery_writes_png(tmp_path):
    png = zs.plot_recovery(fake_result(), tmp_path / "plots" / "recovery.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert zs.plot_recovery(fake_result(models=("teacher",)), tmp_path / "one.png").stat().st_size > 0


def test_evaluate_tasks_end_to_end(models, tok, data_dir):
    names = ["lambada", "piqa", "arc_challenge", "wikitext2"]
    result = zs.evaluate_tasks(models, tok, names, data_dir=data_dir, batch_size=4, max_length=32, progress=False)
    json.loads(json.dumps(result))  # JSON-serialisable
    assert result["models"] == ["student", "teacher"] and list(result["tasks"]) == names
    for name in names:
        entry = result["tasks"][name]
        assert entry["main_metric"] == tasks.TASK_SPECS[name].main_metric
        for model in models:
            assert set(entry["scores"][model]) == {*tasks.TASK_SPECS[name].metrics, "n"}
            assert entry["scores"][model]["n"] == entry["n"]
    rec = result["recovery"]["models"]["student"]
    piqa = result["tasks"]["piqa"]["scores"]
    if piqa["teacher"]["acc"]:
        assert rec["tasks"]["piqa"]["ratio"] == pytest.approx(piqa["student"]["acc"] / piqa["teacher"]["acc"])
    wiki = result["tasks"]["wikitext2"]["scores"]
    expected = wiki["teacher"]["word_perplexity"] / wiki["student"]["word_perplexity"]
    assert rec["tasks"]["wikitext2"]["ratio"] == pytest.approx(expected)
    # The same numbers as scoring each model alone (the requests are shared, not the scores).
    alone = zs.evaluate_tasks({"teacher": models["teacher"]}, tok, ["piqa"], data_dir=data_dir, max_length=32,
                              progress=False)  # fmt: skip
    assert alone["tasks"]["piqa"]["scores"]["teacher"] == piqa["teacher"] and "recovery" not in alone
    assert "student/teacher" in zs.format_table(result)
    with pytest.raises(T2RError, match="unknown"):
        zs.evaluate_tasks(models, tok, ["nope"], data_dir=data_dir)
