"""`make demo`: the tiny world end to end on the CPU, written to outputs/demo/ with a report.

    python -m lora_w2w.demo --out outputs/demo [--base files/tiny/base --space files/tiny/space]
    python -m lora_w2w.demo --out outputs/demo --assets assets   # `make assets`: the README's pictures

Stages: the synthetic identities; the base model's samples; sampling new identities; editing one
along several attributes; inverting a held-out face and an out-of-distribution drawing; exporting
LoRAs; and the evaluator's scores next to the paper's claims (report.md, report.json); then teaser.png,
one labelled picture of sampling, editing and inversion. A stage whose artifacts are not built yet
(`make tiny-world`) is reported as skipped. Every stage shows a progress bar (denoising, inversion, models).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from PIL import Image

from .defaults import DEFAULT_BASE, DEFAULT_EVALUATION, DEFAULT_EVALUATOR, DEFAULT_SPACE, EXAMPLES
from .images import read_image
from .pipeline import image_grid
from .storage import save_png
from .workbench import Workbench

FACE_SEEDS = range(3_000_000, 3_000_008)  # identities of no training set
SEED_LABELS = [f"seed {s}" for s in range(4)]  # the columns of the pictures: images(..., seeds=range(4))
TEASER_SIZE = 96  # px of each image in teaser.png, up from the tiny world's 64 so that it reads at a glance


class Demo:
    """The demo's shared state: a Workbench (the pipeline and the space, loaded once) and the evaluator."""

    def __init__(self, args: argparse.Namespace):
        self.out, self.args = Path(args.out), args
        self.bench = Workbench(args.base, args.space, args.device)
        self._evaluator = None
        self.teaser_parts: dict[str, tuple[list[Image.Image], list[str]]] = {}  # panel -> (images, their labels)

    @property
    def evaluator(self):
        if self._evaluator is None:
            from .tiny.evaluator import Evaluator

            self._evaluator = Evaluator.load(self.args.evaluator)
        return self._evaluator

    def images(self, model, prompt: str | None = None, seeds=range(4)):
        """A w2w model's images of `prompt` (default: the space's); model None: the base model's, which needs
        no space."""
        return self.bench.images(model, prompt, seeds=seeds, steps=self.args.steps, guidance=self.args.guidance)

    # ------------------------------------------------------------------------- stages

    def faces(self) -> dict:
        """Synthetic identities of the tiny world, 4 views each, labelled with their attributes."""
        from .tiny.synthetic import caption, dataset_view_seed, render, sample_identity

        identities = [sample_identity(seed) for seed in FACE_SEEDS]
        images = [render(identity, dataset_view_seed(seed, k)) for seed, identity in zip(FACE_SEEDS, identities)
                  for k in range(4)]
        labels = [caption(identity).removeprefix("a photo of ") for identity in identities]
        save_png(image_grid(images, columns=4, row_labels=labels, column_labels=[f"view {k}" for k in range(4)]),
                 self.out / "faces.png")
        return {"images": "faces.png"}

    def base(self) -> dict:
        """The base model's samples for a few prompts."""
        prompts = ["a photo of a person", "a photo of a young woman with blond hair",
                   "a photo of an old man with a bald head and glasses", "a photo of a man with black hair and a beard"]
        images = [im for prompt in prompts for im in self.images(None, prompt)]
        save_png(image_grid(images, columns=4, row_labels=prompts, column_labels=SEED_LABELS),
                 self.out / "base_samples.png")
        return {"images": "base_samples.png", "prompts": prompts}

    def sampling(self) -> dict:
        """New identities sampled from the space: a row per identity, a column per seed."""
        models = list(self.bench.sample(6, seed=0))
        for i, model in enumerate(models):
            self.bench.export(model, "w2w", self.out / "models" / f"sample_{i}.safetensors")
        images = [im for m in models for im in self.images(m)]
        save_png(image_grid(images, columns=4, row_labels=[f"sample {i}" for i in range(len(models))],
                            column_labels=SEED_LABELS), self.out / "sampling.png")
        self.teaser_parts["sample: new identities"] = (images[::4][:4], [f"sample {i}" for i in range(4)])
        return {"images": "sampling.png", "models": len(models)}

    def editing(self) -> dict:
        """One sampled identity edited along several attributes (+3 dataset standard deviations; friendly names:
        Beard is -No_Beard, Age is -Young)."""
        model, = self.bench.sample(1, seed=3)
        edits = {"Eyeglasses": 3.0, "Beard": 3.0, "Blond_Hair": 3.0, "Age": 3.0}
        rows = [model] + [self.bench.edit(model, {a: s}, debias=["Male"]) for a, s in edits.items()]
        rows.append(self.bench.edit(model, edits, debias=["Male"]))  # all at once: edits compose
        images = [im for m in rows for im in self.images(m, seeds=range(3))]
        save_png(image_grid(images, columns=3, row_labels=["original", *(f"{a} {s:+g} std" for a, s in edits.items()),
                                                         "all four"], column_labels=SEED_LABELS[:3]),
                 self.out / "editing.png")
        first_seed = images[::3]  # original, the edits in order, all four
        self.teaser_parts["edit: one sampled identity"] = ([first_seed[i] for i in (0, 1, 3, 4)],
                                                           ["original", "+glasses", "+blond", "older"])
        return {"images": "editing.png", "rows": ["original", *edits, "all four"]}

    def inversion(self) -> dict:
        """A held-out face (with its mask) and a drawing inverted into the space, then generated."""
        results, images = {}, []
        for name, kind in (("face", "real"), ("drawing", "ood")):
            config = self.bench.inversion_config(kind, steps=self.args.inversion_steps)  # the tiny space's lr for ood
            start = time.perf_counter()
            model, _ = self.bench.invert(EXAMPLES / f"{name}.png", EXAMPLES / f"{name}_mask.png", config)  # "inversion"
            results[name] = {"preset": kind, "components": config.components, "steps": config.steps, "lr": config.lr,
                             "seconds": round(time.perf_counter() - start, 1)}
            self.bench.export(model, "w2w", self.out / "models" / f"inverted_{name}.safetensors")
            self.bench.export(model, "peft", self.out / "loras" / f"inverted_{name}")
            self.bench.export(model, "kohya", self.out / "loras" / f"inverted_{name}_kohya.safetensors")
            resolution = self.bench.resolution()
            images += [read_image(EXAMPLES / f"{name}.png").convert("RGB").resize((resolution, resolution))]
            images += self.images(model, seeds=range(3))
        save_png(image_grid(images, columns=4, row_labels=["face (real)", "drawing (ood)"],
                            column_labels=["input", *SEED_LABELS[:3]]), self.out / "inversion.png")
        self.teaser_parts["invert: one image into a model"] = ([images[i] for i in (0, 1, 4, 5)],
                                                               ["face", "its model", "drawing", "its model"])
        return {"images": "inversion.png", **results, "loras": "loras/"}

    def evaluation(self) -> dict:
        """The evaluator's scores of sampling and editing, measured here with fewer models than w2w evaluate,
        and from w2w evaluate's report of the same space (--evaluation): its editing scores over more models
        and its inversion scores."""
        from .tiny.tables import Context, Settings, evaluate_editing, evaluate_sampling

        settings = Settings(samples=4, seeds=3, steps=self.args.steps, guidance=self.args.guidance)
        context = Context(self.bench, self.evaluator)
        result = {"sampling": evaluate_sampling(context, settings), "editing": evaluate_editing(context, settings)}
        # inversion against Dreambooth baselines trains LoRAs: too slow for the demo, read from w2w evaluate's report
        evaluation = Path(self.args.evaluation)
        if evaluation.is_file():
            report = json.loads(evaluation.read_text())
            if report.get("space_id") == self.bench.space.id:
                result |= {f"{key}_report": report[key] for key in ("editing", "table2") if key in report}
                result["report_source"] = str(evaluation)
        return result

    def teaser(self) -> dict:
        """Sampling, editing and inversion side by side, each panel labelled (the README's first picture)."""
        panels = [image_grid([im.resize((TEASER_SIZE, TEASER_SIZE), Image.LANCZOS) for im in images],
                             columns=len(images), column_labels=labels)
                  for images, labels in self.teaser_parts.values()]
        save_png(image_grid(panels, columns=len(panels), column_labels=list(self.teaser_parts)),
                 self.out / "teaser.png")
        return {"images": "teaser.png"}


def copy_assets(out: Path, stages: dict, assets: Path) -> None:
    """The stages' pictures copied to assets/ as tiny_<name>.png, the names the README links."""
    assets.mkdir(parents=True, exist_ok=True)
    for result in stages.values():
        if "images" in result:
            shutil.copyfile(out / result["images"], assets / f"tiny_{result['images']}")


def write_report(out: Path, stages: dict) -> None:
    (out / "report.json").write_text(json.dumps(stages, indent=2))
    lines = ["# weights2weights demo: the tiny world", ""]
    for name, result in stages.items():
        lines.append(f"## {name}")
        if "skipped" in result:
            lines.append(f"Skipped: {result['skipped']}")
        elif "images" in result:
            lines += [f"![{name}]({result['images']})", ""]
        if name == "evaluation" and "skipped" not in result:
            lines += [_target_sentence(result), "", *_evaluation_table(result)]
        if "seconds" in result:
            lines.append(f"{result['seconds']:.1f} s")
        lines.append("")
    (out / "report.md").write_text("\n".join(lines))


def _target_sentence(result: dict) -> str:
    """What "target met" means, and why this run's editing rows may differ from those of w2w evaluate's report."""
    run = sum(result["editing"]["models_by_sex"].values())
    sentence = ("\"Target met\" says whether the tiny world's figure reaches the target in brackets, which this "
                "project sets for each of the paper's claims (most are qualitative)")
    if "editing_report" not in result:
        return sentence + "."
    quoted = sum(result["editing_report"]["models_by_sex"].values())
    return (sentence + f"; this run edits {run} sampled models, so one model moves an editing row by "
            f"{1 / run:.0%} and its rows may differ from the {quoted}-model rows quoted from "
            f"{result['report_source']}, which `w2w evaluate` measured with more models.")


def _met(ok: bool, target: str) -> str:
    return f"{'yes' if ok else '**no**'} ({target})"


def _evaluation_table(result: dict) -> list[str]:
    """The evaluator's figures next to the paper's claims, each with its target and whether it is met."""
    from .editing import friendly_name
    from .tiny.tables import EDITED, PAPER

    sampling, editing = result["sampling"], result["editing"]
    consistency_target, targets = sampling["target"], editing["targets"]
    edit_target = f">= {targets['changed']:.0%} / >= {targets['others_kept']:.0%}"
    consistency = sampling["attribute_consistency_across_seeds"]
    same, different = sampling["identity_similarity_same_model"], sampling["identity_similarity_different_models"]
    nearest = sampling["nearest_dataset_distance_over_dataset_spacing"]
    rows = ["| claim | paper | tiny world | target met |", "| --- | --- | --- | --- |",
            f"| a sampled identity keeps its attributes across seeds | qualitative (Fig. 4) | {consistency:.0%} | "
            f"{_met(consistency >= consistency_target, f'>= {consistency_target:.0%}')} |",
            f"| sampled identities differ: identity similarity within / between models | qualitative (Fig. 4) | "
            f"{same:.2f} / {different:.2f} | {_met(different < same, 'between < within')} |",
            f"| samples are new: distance to the nearest dataset model / dataset spacing | nearest neighbours "
            f"differ (Fig. 4) | {nearest:.2f} | {_met(nearest >= 0.5, '>= 0.5')} |"]
    sources = [("this run", editing)]
    if "editing_report" in result:
        sources.append((f"from {result['report_source']}", result["editing_report"]))
    for source, scores in sources:
        label = f"{source}, {sum(scores['models_by_sex'].values())} models"
        for attribute in EDITED:
            e = scores[attribute]
            met = e["changed"] >= targets["changed"] and e["others_kept"] >= targets["others_kept"]
            rows.append(f"| editing {friendly_name(attribute)} ({label}): changed / others kept / identity "
                        f"similarity | qualitative (Fig. 5) | {e['changed']:.0%} / {e['others_kept']:.0%} / "
                        f"{e['identity_similarity']:.2f} | {_met(met, edit_target)} |")
    if "table2_report" in result:
        kinds = ("w2w", "dreambooth_1", "dreambooth_multi")
        ours, one, many = (result["table2_report"][k] for k in kinds)
        paper = " / ".join(f"{PAPER['table2_id_score'][k]:.2f}" for k in kinds)
        rows.append(f"| inversion of one image: identity similarity, w2w / Dreambooth-LoRA 1 image / 10 images "
                    f"(from {result['report_source']}) | ID score {paper} (Table 2) | "
                    f"{ours['identity_similarity']:.2f} / {one['identity_similarity']:.2f} / "
                    f"{many['identity_similarity']:.2f} | "
                    f"{_met(ours['identity_similarity'] > one['identity_similarity'], 'w2w > 1-image Dreambooth')} |")
        rows.append(f"| the same, attribute agreement | | {ours['attribute_agreement']:.0%} / "
                    f"{one['attribute_agreement']:.0%} / {many['attribute_agreement']:.0%} | |")
    return rows + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the tiny world end to end and write a report.")
    parser.add_argument("--out", default="outputs/demo", help="output folder (default: %(default)s)")
    parser.add_argument("--base", default=DEFAULT_BASE, help="base pipeline (default: %(default)s)")
    parser.add_argument("--space", default=DEFAULT_SPACE, help="space (default: %(default)s)")
    parser.add_argument("--evaluator", default=DEFAULT_EVALUATOR, help="evaluator weights")
    parser.add_argument("--evaluation", default=DEFAULT_EVALUATION,
                        help="w2w evaluate's report of the space, whose inversion figures the report quotes "
                             "(default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda ... (default: auto)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps per image (default: %(default)s)")
    parser.add_argument("--guidance", type=float, default=5.0, help="guidance scale (default: %(default)s)")
    parser.add_argument("--inversion-steps", type=int, default=200,
                        help="Adam steps of each inversion (the paper's presets: 400 and 800; default: %(default)s)")
    parser.add_argument("--assets", metavar="DIR",
                        help="also copy the pictures to DIR as tiny_<name>.png (`make assets`: DIR = assets)")
    args = parser.parse_args(argv)
    demo = Demo(args)
    demo.out.mkdir(parents=True, exist_ok=True)
    have_base = (Path(args.base) / "model_index.json").is_file() or not args.base.startswith(("files/", ".", "/"))
    have_space = (Path(args.space) / "space.json").is_file()
    missing = "not built yet: run `make tiny-world`"
    plan = [("synthetic identities", demo.faces, None),
            ("base model", demo.base, None if have_base else f"{args.base} {missing}"),
            ("sampling", demo.sampling, None if have_base and have_space else f"{args.space} {missing}"),
            ("editing", demo.editing, None if have_base and have_space else f"{args.space} {missing}"),
            ("inversion and export", demo.inversion, None if have_base and have_space else f"{args.space} {missing}"),
            ("evaluation", demo.evaluation, None if have_base and have_space else f"{args.space} {missing}"),
            ("teaser", demo.teaser, None if have_base and have_space else f"{args.space} {missing}")]
    stages = {}
    for name, run, skipped in plan:
        if skipped:
            stages[name] = {"skipped": skipped}
            print(f"{name}: skipped ({skipped})")
            continue
        print(f"{name} ...", flush=True)
        start = time.perf_counter()
        stages[name] = {**run(), "seconds": time.perf_counter() - start}
        print(f"{name}: {stages[name]['seconds']:.1f} s", flush=True)
    write_report(demo.out, stages)
    if args.assets:
        copy_assets(demo.out, stages, Path(args.assets))
    print(f"wrote {demo.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
