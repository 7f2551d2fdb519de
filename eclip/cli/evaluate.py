"""`eclip evaluate`: Recall@K both ways, median / mean rank and rsum on a dataset split."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from eclip.cli import app
from eclip.cli.options import (DATA_PANEL, MODEL_PANEL, Checkpoint, DataRoot, Dataset, Device, ImageFolder, Json, Model,
                               Precision, Pretrained, Seed, Split, model_spec, user_errors)
from eclip.errors import EclipError

OUTPUT_PANEL = "Output"


@app.command(help="Retrieval metrics of a model on a dataset split: Recall@K text->image and image->text, "
                  "median and mean rank (from 1), rsum. Identical image files count as one gallery item "
                  "(--same-image); a query is a hit at K when any of its positives is in the top K; ties rank "
                  "the positive after the tied negatives. The paper's protocol is --same-image none.")
def evaluate(
    dataset: Dataset = None,
    data_root: DataRoot = None,
    split: Split = "test",
    image_folder: ImageFolder = None,
    model: Model = None,
    pretrained: Pretrained = None,
    checkpoint: Checkpoint = None,
    device: Device = None,
    precision: Annotated[Optional[Precision], typer.Option(
        "--precision", rich_help_panel=MODEL_PANEL, show_default=False,
        help="Compute precision. Default: fp32; with --protocol paper fp16 on a CUDA device.")] = None,
    seed: Seed = None,
    embeddings: Annotated[Optional[Path], typer.Option(
        "--embeddings", metavar="DIR", rich_help_panel=DATA_PANEL, show_default=False,
        help="Evaluate the embeddings `eclip embed` stored in DIR instead of computing them "
             "(images and captions).")] = None,
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
        help="Also write the JSON report to FILE (atomically).")] = None,
    dump_ranks: Annotated[Optional[Path], typer.Option(
        "--dump-ranks", rich_help_panel=OUTPUT_PANEL, metavar="FILE", show_default=False,
        help="Write one JSON line per query: direction, query id, rank of its first positive, "
             "its positives, and the top-K ids with scores (K = the largest --recall-k).")] = None,
):
    with user_errors():
        import json

        from eclip.evaluate import check_same_image, parse_recall_k
        from eclip.protocol import PAPER_EVALUATE, check_protocol, paper_options
        ks = parse_recall_k(recall_k)
        check_same_image(same_image)
        check_protocol(protocol)
        # --same-image has a default, so only a value other than it can contradict the protocol
        same_image = paper_options(protocol, {"same_image": None if same_image == "bytes" else same_image},
                                   PAPER_EVALUATE)["same_image"] or same_image
        precision = getattr(precision, "value", precision)
        if protocol == "paper" and embeddings is None:
            from eclip.protocol import evaluation_precision
            precision = evaluation_precision(protocol, precision, device)
        spec = model_spec(model, pretrained, checkpoint, device, precision or "fp32", seed)
        if embeddings is not None:   # model options, if given, must name the model the store was made with
            result = _from_embeddings(embeddings, ks, dump_ranks, spec, same_image)
        else:
            from eclip.evaluate import evaluate as run
            if not dataset:
                raise EclipError("--dataset is required (n24news, visualnews, goodnews or a .jsonl / .csv file), "
                                 "or --embeddings DIR")
            result = run(spec, dataset, data_root, split, recall_k=ks, batch_size=batch_size, dump_ranks=dump_ranks,
                         image_folder=image_folder, same_image=same_image, protocol=protocol)
        if output is not None:
            from eclip.atomic import write_text
            write_text(output, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        if json_output:
            from eclip.console import print_json
            print_json(result)
        else:
            from eclip.console import out
            from eclip.evaluate import report_table
            out.print(report_table(result))


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
