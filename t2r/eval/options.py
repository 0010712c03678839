"""What ``t2r eval`` can be asked, declared once (the command line is built from these fields). Imports nothing
heavy, so that ``t2r eval --help`` starts at once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from t2r.errors import T2RError
from t2r.models.settings import check_fields, option

DEFAULT_TASKS = ("lambada", "piqa", "arc_easy", "arc_challenge", "winogrande", "wikitext2")
TASK_NAMES = (*DEFAULT_TASKS, "hellaswag", "mmlu")


def flag(name: str) -> str:
    f = {f.name: f for f in dataclasses.fields(EvalOptions)}[name]
    spelled = f.metadata.get("flag")
    return spelled.split("/")[0] if spelled else "--" + name.replace("_", "-")


@dataclass(kw_only=True)
class EvalOptions:
    data: list[str] = option([], "held-out text for perplexity (files, globs, dirs; repeat)")
    ppl: bool = option(True, "perplexity over fixed windows (with --data)", flag="--ppl/--no-ppl")
    windows: list[int] = option([2048, 4096], "perplexity windows (repeat)", min=2, max=1 << 20, flag="--window")
    max_windows: int = option(32, "windows scored per length", min=1, max=1 << 20)
    passkey: bool = option(True, "passkey retrieval", flag="--passkey/--no-passkey")
    contexts: list[int] = option(
        [1024, 2048, 4096], "passkey context lengths (repeat)", min=128, max=1 << 20, flag="--context"
    )
    trials: int = option(100, "passkey trials per context", min=1, max=100_000)
    seed: int = option(0, "passkey seed", min=0, max=2**31 - 1)
    tasks: list[str] = option(
        [],
        "zero-shot tasks, comma-separated: " + ", ".join(TASK_NAMES) + ", or 'default' (the first six), scored "
        "as lm-evaluation-harness scores them",
        choices=TASK_NAMES,
        cli_type=str,
    )
    limit: int | None = option(None, "zero-shot: first N examples per task (LAMBADA, ARC, ...; articles for WikiText)",
                               min=1, max=10**7)  # fmt: skip
    data_dir: str | None = option(None, "zero-shot: folder of the task files (default: $T2R_EVAL_DATA, else "
                                  "../shared/data/eval if present; else the Hugging Face hub by name)")  # fmt: skip
    max_length: int | None = option(None, "zero-shot: context window in tokens (default: the model's)", min=16,
                                    max=1 << 20)  # fmt: skip
    batch: int = option(4, "rows per forward (zero-shot: 4x this many)", min=1, max=4096)
    teacher: bool = option(True, "evaluate the teacher beside the student", flag="--teacher/--no-teacher")
    device: str | None = option(None, "cpu, cuda, cuda:1 (default: cuda if available)")
    plot: str | None = option(None, "zero-shot: write a recovery plot (PNG, teacher vs student per task) here")
    json_out: str | None = option(None, "write the full results here (JSON)", flag="--json")

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):  # the command line's comma-separated form
            names = [t.strip() for t in self.tasks.split(",") if t.strip()]
            self.tasks = [t for name in names for t in (DEFAULT_TASKS if name == "default" else [name])]

    def validate(self) -> None:
        skip = ()
        if not (self.ppl and self.data):
            skip += ("windows", "max_windows")
        if not self.passkey:
            skip += ("contexts", "trials", "seed")
        try:
            check_fields(self, label=flag, skip=skip)
        except ValueError as e:
            raise T2RError(str(e)) from None
        if self.ppl and self.data and not self.windows:
            raise T2RError("--window: give at least one perplexity window")
        if self.passkey and not self.contexts:
            raise T2RError("--context: give at least one passkey context")
        if not (self.ppl and self.data) and not self.passkey and not self.tasks:
            raise T2RError("nothing to evaluate: give --data (perplexity), --passkey or --tasks")
