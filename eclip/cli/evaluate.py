"""`eclip evaluate`: Recall@K both ways, median / mean rank and rsum on a dataset split."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from eclip.cli import app
from eclip.cli.options import (DATA_PANEL, MODEL_PANEL, DataRoot, Device, IdKey, ImageFolder, ImageKey, Json,
                               Model, Precision, Pretrained, Seed, TextKey, columns, model_spec,
                               user_errors)
from eclip.errors import EclipError

OUTPUT_PANEL = "Output"
CLASSIFY_PANEL = "Classification (--task classify)"


@app.command(help="Retrieval metrics of a model on a dataset split: Recall@K text->image and image->text, "
                  "median and mean rank (from 1), rsum. Identical image files count as one gallery item "
                  "(--same-image); a query is a hit at K when any of its positives is in the top K; ties rank "
                  "the positive after the tied negatives. The paper's protocol is --same-image none. "
                  "--task classify: zero-shot or linear-probe classification of the records' labels. Several "
                  "--checkpoint / --dataset / --split: one table, a row per model. --report DIR: an HTML page.")
def evaluate(
    dataset: Annotated[Optional[List[str]], typer.Option(
        "--dataset", rich_help_panel=DATA_PANEL, show_default=False,
        help="n24news | visualnews | goodnews, or a FILE.jsonl / FILE.csv with fields image, text [, id, "
             "explanation, entities, label]. Repeat it for one table over several datasets.")] = None,
    data_root: DataRoot = None,
    split: Annotated[List[str], typer.Option(
        "--split", rich_help_panel=DATA_PANEL,
        help="train | val | test (N24News's 'dev' is accepted for val); all for a release that has no split. "
             "Repeat it to evaluate each benchmark on several splits.")] = ["test"],
    image_folder: ImageFolder = None,
    image_key: ImageKey = None,
    text_key: TextKey = None,
    id_key: IdKey = None,
    model: Model = None,
    pretrained: Pretrained = None,
    checkpoint: Annotated[Optional[List[Path]], typer.Option(
        "--checkpoint", rich_help_panel="Model", show_default=False,
        help="An eclip .safetensors checkpoint. Repeat it for one table over several models; --model / "
             "--pretrained, when given too, add one more row (e.g. the zero-shot baseline).")] = None,
    device: Device = None,
    precision: Annotated[Optional[Precision], typer.Option(
        "--precision", rich_help_panel=MODEL_PANEL, show_default=False,
        help="Compute precision. Default: fp32; with --protocol paper fp16 on a CUDA device.")] = None,
    seed: Seed = None,
    embeddings: Annotated[Optional[Path], typer.Option(
        "--embeddings", metavar="DIR", rich_help_panel=DATA_PANEL, show_default=False,
        help="Without --dataset: evaluate the embeddings `eclip embed` stored in DIR instead of computing "
             "them. With --dataset: keep each (model, dataset) cell's features in DIR and reuse them when "
             "the same model evaluates the same records again.")] = None,
    same_image: Annotated[str, typer.Option(
        "--same-image", metavar="bytes|path|none",
        help="Which records share one gallery image: bytes (identical file contents), path (the same file "
             "path: CLIP_benchmark's convention) or none (every record its own gallery item: the EntityCLIP "
             "reference's protocol, which the paper's numbers use).")] = "bytes",
    protocol: Annotated[str, typer.Option(
        "--protocol", metavar="eclip|paper",
        help="paper: the reference code's evaluation in one switch: --same-image none, its readers (empty "
             "captions kept, GoodNews test with its broken_images.txt entries) and fp16 on a GPU (fp32 on the "
             "CPU, as the reference) (README, 'Comparing with the paper').")] = "eclip",
    recall_k: Annotated[str, typer.Option(
        "--recall-k", metavar="K,K,...", help="Recall cut-offs (rsum always uses 1, 5 and 10).")] = "1,5,10",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images / captions per forward pass.")] = 64,
    json_output: Json = False,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", rich_help_panel=OUTPUT_PANEL, metavar="FILE", show_default=False,
        help="Also write the JSON report to FILE (atomically); for several models or datasets, the table: "
             "CSV when FILE ends in .csv, else JSON with every cell's report.")] = None,
    dump_ranks: Annotated[Optional[Path], typer.Option(
        "--dump-ranks", rich_help_panel=OUTPUT_PANEL, metavar="FILE", show_default=False,
        help="Write one JSON line per query: direction, query id, rank of its first positive, "
             "its positives, and the top-K ids with scores (K = the largest --recall-k).")] = None,
    wise_ft: Annotated[Optional[str], typer.Option(
        "--wise-ft", metavar="ALPHA,ALPHA,...", show_default=False,
        help="WiSE-FT curve: evaluate (1 - ALPHA) * base + ALPHA * the --checkpoint for each ALPHA, in one "
             "table; base = the model the checkpoint's run started from, or the one --model/--pretrained name.")] = None,
    task: Annotated[str, typer.Option(
        "--task", metavar="retrieval|classify",
        help="retrieval (Recall@K both ways) or classify (records' labels: N24News's section, a table's "
             "`label`; top-1 / top-5, mean per-class recall, per-class scores, confusion matrix).")] = "retrieval",
    mode: Annotated[str, typer.Option(
        "--mode", metavar="zero-shot|linear-probe", rich_help_panel=CLASSIFY_PANEL,
        help="zero-shot: class vectors from prompt templates; linear-probe: logistic regression on frozen "
             "features of --train-split, C chosen on --val-split, refitted on both (CLIP_benchmark's way).")
    ] = "zero-shot",
    inputs: Annotated[str, typer.Option(
        "--inputs", metavar="image|text|image+text", rich_help_panel=CLASSIFY_PANEL,
        help="What is classified: the image, the caption, or both (the mean of the two normalised "
             "vectors, normalised).")] = "image",
    templates: Annotated[Optional[Path], typer.Option(
        "--templates", metavar="FILE", rich_help_panel=CLASSIFY_PANEL, show_default=False,
        help="Zero-shot prompt templates, one per line, each with {c} where the class name goes. Default: "
             "'a news photo about {c}.' and three more.")] = None,
    classes: Annotated[Optional[Path], typer.Option(
        "--classes", metavar="FILE", rich_help_panel=CLASSIFY_PANEL, show_default=False,
        help="The classes, one label per line, optionally a tab and the name to show and put in the "
             "templates. Default: the distinct labels, sorted.")] = None,
    train_split: Annotated[str, typer.Option(
        "--train-split", rich_help_panel=CLASSIFY_PANEL, help="Linear probe: the split it is fitted on.")] = "train",
    val_split: Annotated[str, typer.Option(
        "--val-split", rich_help_panel=CLASSIFY_PANEL, help="Linear probe: the split C is chosen on.")] = "val",
    report: Annotated[Optional[Path], typer.Option(
        "--report", rich_help_panel=OUTPUT_PANEL, metavar="DIR", show_default=False,
        help="Write a self-contained HTML report to DIR (a new or empty folder; open DIR/index.html): the "
             "metrics, the recall@K curve and the worst and best queries with their top 5 as thumbnails "
             "(retrieval; R@5 is added when --recall-k stops below 5), or the confusion matrix and the most "
             "confused classes with examples (classify).")] = None,
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", rich_help_panel=OUTPUT_PANEL, metavar="FILE.png", show_default=False,
        help="Classify: write the confusion matrix (rows normalised) as a PNG.")] = None,
):
    with user_errors():
        from eclip.evaluate import check_same_image, parse_recall_k
        from eclip.evaluate_grid import check_task, dataset_cells, model_specs, read_cells
        ks = parse_recall_k(recall_k)
        check_same_image(same_image)
        from eclip.protocol import PAPER_EVALUATE, check_protocol, paper_options
        check_protocol(protocol)
        # --same-image has a default, so only a value other than it can contradict the protocol
        same_image = paper_options(protocol, {"same_image": None if same_image == "bytes" else same_image},
                                   PAPER_EVALUATE)["same_image"] or same_image
        precision = getattr(precision, "value", precision)
        if protocol == "paper" and embeddings is None:
            from eclip.protocol import evaluation_precision
            precision = evaluation_precision(protocol, precision, device)
        precision = precision or "fp32"
        check_task(task)
        options = _classify_options(mode, inputs, templates, classes, train_split, val_split,
                                    batch_size) if task == "classify" else None
        if plot is not None and task != "classify":
            raise EclipError(f"--plot {plot}: the confusion matrix PNG is for --task classify "
                             "(retrieval's recall@K curve is in --report)")
        if report is not None:
            from eclip.report import check_report_dir
            check_report_dir(report)
        checkpoints = list(checkpoint or [])
        if wise_ft is not None:      # one evaluation per alpha (eclip.exporters.wise_ft), one table
            if len(checkpoints) != 1 or len(dataset or []) > 1 or len(split) > 1 or task != "retrieval":
                raise EclipError("--wise-ft: one --checkpoint (the fine-tuned model), one --dataset and one "
                                 "--split, retrieval only")
            from eclip.exporters.wise_ft import curve_table, evaluate_curve
            spec = model_spec(model, pretrained, checkpoints[0], device, precision, seed)
            result = evaluate_curve(wise_ft, spec, dataset=(dataset or [None])[0], data_root=data_root,
                                    split=split[0], recall_k=ks, batch_size=batch_size,
                                    image_folder=image_folder, same_image=same_image)
            return _show_one(result, output, json_output, curve_table)
        if embeddings is not None and not dataset:   # model options, if given, must name the store's model
            if task != "retrieval" or report is not None or len(checkpoints) > 1:
                raise EclipError(f"--embeddings {embeddings}: an `eclip embed` store is evaluated for retrieval "
                                 "with one model and no --report; give --dataset to evaluate data")
            spec = model_spec(model, pretrained, checkpoints[0] if checkpoints else None, device, precision, seed)
            result = _from_embeddings(embeddings, ks, dump_ranks, spec, same_image)
            return _show_one(result, output, json_output)
        if not dataset:
            raise EclipError("--dataset is required (n24news, visualnews, goodnews or a .jsonl / .csv file), "
                             "or --embeddings DIR")
        specs = model_specs(model, pretrained, checkpoints, device, precision, seed)
        cells = dataset_cells(dataset, split)
        records = read_cells(cells, data_root, image_folder, options, columns(image_key, text_key, id_key),
                             protocol)   # labels checked before a model loads
        if len(specs) > 1 or len(cells) > 1:
            if dump_ranks is not None or plot is not None:
                raise EclipError("--dump-ranks and --plot are for one model on one dataset split")
            return _show_grid(specs, cells, records, task, data_root, image_folder, ks, same_image, batch_size,
                              options, embeddings, output, json_output, report)
        (one_dataset, one_split), spec = cells[0], specs[0]
        if task == "classify":
            from eclip.classify import classify
            result = classify(spec, one_dataset, data_root, one_split or "test", options=options,
                              records=records[cells[0]], image_folder=image_folder, features_dir=embeddings)
            if plot is not None:
                from eclip.report.plots import confusion_png
                confusion_png(result, plot)
        else:
            import tempfile

            from eclip.evaluate import evaluate as run
            scratch = tempfile.TemporaryDirectory(prefix="eclip-report-") if report is not None else None
            if scratch is not None:       # the report reads each query's rank and top results from the dump
                dump_ranks = dump_ranks or Path(scratch.name) / "ranks.jsonl"
                from eclip.report import TOP
                ks = ks if max(ks) >= TOP else tuple(sorted({*ks, TOP}))
            try:
                result = run(spec, one_dataset, data_root, one_split or "test", recall_k=ks, batch_size=batch_size,
                             dump_ranks=dump_ranks, image_folder=image_folder, same_image=same_image,
                             records=records[cells[0]], features_dir=embeddings)
                if report is not None:
                    _write_report(report, result, dump_ranks, records[cells[0]])
            finally:
                if scratch is not None:
                    scratch.cleanup()
        if report is not None and task == "classify":
            _write_report(report, result, None, records[cells[0]])
        _show_one(result, output, json_output)


def _write_report(folder, result, ranks_file, records):
    from eclip.console import note
    from eclip.report import write_report
    note(f"report: {write_report(folder, result, ranks_file=ranks_file, records=records)}")


def _classify_options(mode, inputs, templates, classes, train_split, val_split, batch_size):
    """--task classify's options, checked (templates and classes files read) before anything loads."""
    from eclip.classify import DEFAULT_TEMPLATES, ClassifyOptions, read_classes, read_templates
    return ClassifyOptions(mode=mode, inputs=inputs,
                           templates=read_templates(templates) if templates is not None else DEFAULT_TEMPLATES,
                           classes=read_classes(classes) if classes is not None else None,
                           train_split=train_split, val_split=val_split, batch_size=batch_size).check()


def _show_one(result, output, json_output, table=None):
    import json
    if output is not None:
        from eclip.atomic import write_text
        write_text(output, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    if json_output:
        from eclip.console import print_json
        print_json(result)
    else:
        from eclip.console import out
        if result.get("task") == "classify":
            from eclip.classify import report_table
        else:
            from eclip.evaluate import report_table
        out.print((table or report_table)(result))


def _show_grid(specs, cells, records, task, data_root, image_folder, ks, same_image, batch_size, options,
               embeddings, output, json_output, report=None):
    import tempfile

    from eclip.evaluate_grid import dump_path, evaluate_grid, grid_table, write_grid
    with tempfile.TemporaryDirectory(prefix="eclip-report-") as scratch:
        dumps = scratch if report is not None and task == "retrieval" else None
        if dumps is not None:                   # the report shows each query's top 5
            from eclip.report import TOP
            ks = ks if max(ks) >= TOP else tuple(sorted({*ks, TOP}))
        grid = evaluate_grid(specs, cells, task=task, data_root=data_root, image_folder=image_folder, recall_k=ks,
                             same_image=same_image, batch_size=batch_size, classify_options=options,
                             features_dir=embeddings, records=records, dump_dir=dumps)
        if report is not None:
            from eclip.console import note
            from eclip.report import write_grid_report
            where = [(m, d) for m in range(len(specs)) for d in range(len(cells))]
            page = write_grid_report(report, grid, {w: dump_path(dumps, *w) for w in where} if dumps else {},
                                     {(m, d): records[cells[d]] for m, d in where})
            note(f"report: {page}")
    if output is not None:
        write_grid(output, grid)
    if json_output:
        from eclip.console import print_json
        print_json(grid)
    else:
        from eclip.console import out
        out.print(grid_table(grid))


def _from_embeddings(folder: Path, ks, dump_ranks, spec, same_image: str = "bytes"):
    """--embeddings: eclip embed's store computes nothing again; it owns `evaluate_embeddings`
    (ground truth as eclip.evaluate builds it, then eclip.evaluate.evaluate_features)."""
    try:
        import eclip.embedstore as store
    except ImportError:
        raise EclipError(f"--embeddings {folder}: --embeddings needs eclip embed's store (eclip.embedstore), "
                         f"which this installation does not have; evaluate with the model options instead")
    hook = getattr(store, "evaluate_embeddings", None)
    if hook is None:
        raise EclipError(f"--embeddings {folder}: --embeddings needs eclip embed's store to provide "
                         f"evaluate_embeddings, which this version lacks")
    return hook(folder, recall_k=ks, dump_ranks=dump_ranks, spec=spec, same_image=same_image)
