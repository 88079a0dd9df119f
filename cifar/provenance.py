"""Honest evaluation: what a checkpoint trained on, and whether the images a command evaluates are among them.

A checkpoint written by `fit` carries a *training record* in the data module's state (Lightning saves
`CIFAR10DataModule.state_dict()` into every checkpoint and hands it back to `load_state_dict` on restore):
a list of entries, one per split that fit trained on (a fit resumed on another split adds one), each

    {"source": datasets.source(...),      # format, path, images, fingerprint of the training pool
     "split": {"seed", "val_size", "test_size", "train", "val", "test"},   # options and the counts they gave
     "held_out": int32 tensor}            # indices into the source's images kept out of training (val + test)

The rules:

1. `validate`, `test` and a resumed `fit` with a checkpoint use the split of the checkpoint's latest entry
   for the same data (same fingerprint), except for the options set on the command line (`adopt_split`,
   run by the CLI before anything is built). Data with another fingerprint keeps the configured split.
2. The images a command evaluates (validate and fit: the validation set; test: the held-out test set or
   the data's test split) are checked against every entry of the same fingerprint: an image trained on
   stops the command with one error, unless `--data.allow_overlap true`; then every place the results
   go says "overlaps training data". The CLI checks before it makes a run (`adopt_split`), from the file
   listing; the data module checks again on the images it read, when Lightning restores the checkpoint.
3. Other data (another folder, the official test batches) is fine: one line names what was evaluated.
4. A checkpoint written before these records loads; its training data cannot be checked, said once.
"""

from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from cifar import datasets
from cifar.checkpoints import load_checkpoint
from cifar.errors import UserError

SPLIT_OPTIONS = ("seed", "val_size", "test_size")
OVERLAPS = "overlaps training data"  # the mark on results evaluated on training images


def count(size: int | float, total: int, name: str) -> int:
    """A size given as a count (int) or a fraction of `total` (float in [0, 1))."""
    n = round(size * total) if isinstance(size, float) else size
    if not (0 <= n < total) or (isinstance(size, float) and not 0 <= size < 1):
        raise UserError(f"--data.{name}={size} is out of range: give a count in [0, {total}) or a fraction in [0, 1)")
    return n


def split_indices(n: int, generator: torch.Generator, val_size: int | float, test_size: int | float | None):
    """(train, val, test) indices of a pool of `n` images: one random order drawn from `generator`, test first."""
    n_test = 0 if test_size is None else count(test_size, n, "test_size")
    n_val = count(val_size, n - n_test, "val_size")
    order = torch.randperm(n, generator=generator)
    return order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]


def training_record(checkpoint: dict) -> list[dict] | None:
    """The training record in a loaded checkpoint (under the data module's class name), or None."""
    for value in checkpoint.values():
        if isinstance(value, dict) and "trained_on" in value:
            return value["trained_on"]
    return None


def split_text(split: dict) -> str:
    return ", ".join(f"{key} {split[key]}" for key in SPLIT_OPTIONS)


def given_on_command_line(argv: list[str]) -> set[str]:
    """The split options (`--data.seed`, `--data.val_size`, `--data.test_size`) set in `argv`."""
    return {key for key in SPLIT_OPTIONS for arg in argv if arg == f"--data.{key}" or arg.startswith(f"--data.{key}=")}


def adopt_split(data: Namespace, ckpt_path: str, given: set[str], command: str) -> None:
    """Rule 1: set the data config's split options from the checkpoint's record of the same data, except `given`;
    then rule 2 for what `command` will evaluate, before any run or W&B run is made for it."""
    record = training_record(load_checkpoint(Path(ckpt_path)))
    here = datasets.source(Path(data.data_dir), "train") if record else None
    entries = [e for e in record or [] if here and e["source"]["fingerprint"] == here["fingerprint"]]
    if not entries:
        return
    split = entries[-1]["split"]
    for key in set(SPLIT_OPTIONS) - given:
        data[key] = split[key]
    kept = f"; {', '.join(f'--data.{key} {data[key]}' for key in sorted(given))} from the command line" if given else ""
    rank_zero_info(f"Split: the checkpoint's ({split_text(split)}){kept}")
    if command == "test" and data.test_size is None:  # the data's own test split: other data, checked once read
        if split["test_size"] is None and datasets.source(Path(data.data_dir), "test") is None:
            raise UserError(f"{data.data_dir} has no test split, and checkpoint {ckpt_path} held out only its "
                            f"{split['val']} validation images ({split_text(split)}): evaluate on those with `validate "
                            f"--ckpt_path {ckpt_path}`, add test/<class>/ folders, or fit again with --data.test_size "
                            f"5000 to hold out a test set")  # fmt: skip
        return
    source = {**here, "images": entries[-1]["source"]["images"]}  # same files, so the same images read
    _, val, test = split_indices(source["images"], torch.Generator().manual_seed(data.seed), data.val_size, data.test_size)
    chosen = {key: data[key] for key in SPLIT_OPTIONS}
    what = "test" if command == "test" else "validation"
    check(source, test if command == "test" else val, what, chosen, record, ckpt_path, data.allow_overlap)


def trained_mask(source: dict, record: list[dict]) -> Tensor:
    """Which of the source's images (bool, by index) any entry of the record with its fingerprint trained on."""
    trained = torch.zeros(source["images"], dtype=torch.bool)
    for entry in record:
        if entry["source"]["fingerprint"] == source["fingerprint"]:
            in_entry = torch.ones(source["images"], dtype=torch.bool)
            in_entry[entry["held_out"].long()] = False
            trained |= in_entry
    return trained


def check(source: dict, indices: Tensor, what: str, split: dict | None, record: list[dict] | None,
          ckpt_path: str, allow_overlap: bool) -> dict:  # fmt: skip
    """Rules 2-4 for the images `indices` of `source` (`what`: "test", "validation"), drawn by `split` (None: the
    whole source). Returns what was evaluated, as runs and reports record it; raises on an overlap not allowed."""
    drawn = f"{len(indices)} {what} images held out of " if split else f"{what} images: "
    data = f"{drawn}{datasets.describe_source(source)}" + (f" by split {split_text(split)}" if split else "")
    evaluation = {"data": data, "images": len(indices), "source": source, "split": split, "checkpoint": str(ckpt_path),
                  "overlap": None}  # fmt: skip
    if record is None:
        evaluation["note"] = (f"checkpoint {ckpt_path} carries no record of its training data (written before the app "
                              f"kept one): whether these images trained it cannot be checked")  # fmt: skip
        return evaluation
    overlap = int(trained_mask(source, record)[indices].sum()) if len(indices) else 0
    evaluation["overlap"] = overlap
    same = [e for e in record if e["source"]["fingerprint"] == source["fingerprint"]]
    if not same:
        trained = "; ".join(datasets.describe_source(e["source"]) for e in record)
        evaluation["note"] = f"other data than checkpoint {ckpt_path} trained on ({trained})"
    elif overlap == 0:
        evaluation["note"] = f"none of them trained checkpoint {ckpt_path}"
    elif allow_overlap:
        evaluation["note"] = (f"{OVERLAPS}, {overlap} of the {len(indices)} images trained checkpoint {ckpt_path} "
                              f"(--data.allow_overlap true)")  # fmt: skip
    else:
        this = f"this command's {split_text(split)}" if split else "the whole training pool"
        raise UserError(
            f"{overlap} of the {len(indices)} {what} images were used to train checkpoint {ckpt_path} (it trained on "
            f"{datasets.describe_source(source)} with split {split_text(same[-1]['split'])}; {this}). Evaluate honestly "
            f"on the images it held out (leave --data.seed, --data.val_size and --data.test_size off the command "
            f"line: the checkpoint's split is used) or on separate data (test/<class>/ folders, the official test "
            f"batches); to evaluate on them anyway, pass --data.allow_overlap true (the results are then marked "
            f"'{OVERLAPS}')"
        )
    return evaluation
