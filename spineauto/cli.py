"""The `spineauto` command: one small function per command, no logic of its own."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from spineauto.errors import SpineautoError

console = Console(stderr=True)
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Self-configuring deep learning for spinal-cord MRI (segmentation, classification, pipeline).")
convert_app = typer.Typer(no_args_is_help=True, help="Convert BIDS or DICOM data into a raw dataset (nnU-Net v2 layout).")
app.add_typer(convert_app, name="convert")

DatasetOpt = typer.Option(..., "-d", "--dataset", help="Dataset id (1) or folder name (Dataset001_Name).")


def _command(name: str, **kw):
    """Register under the documented underscore name, with a hidden dashed alias."""
    def deco(fn):
        app.command(name, **kw)(fn)
        if "_" in name:
            app.command(name.replace("_", "-"), hidden=True, **kw)(fn)
        return fn
    return deco


@app.callback()
def _main(verbose: bool = typer.Option(False, "-v", "--verbose", help="Show debug logging.")):
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)], force=True)
    for noisy in ("matplotlib", "PIL", "urllib3", "wandb", "fsspec", "numexpr", "numexpr.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@_command("plan_and_preprocess")
def plan_and_preprocess(
    dataset: str = DatasetOpt,
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the integrity check (geometry, labels, NaN, counts)."),
    preset: Optional[Path] = typer.Option(None, "--preset", help="YAML overriding planned values, e.g. plans/spinal_cord_segmentation.yaml."),
    num_processes: int = typer.Option(min(os.cpu_count() or 1, 8), "-np", "--num-processes", help="Parallel worker processes."),
    gpu_memory_gb: Optional[float] = typer.Option(None, "--gpu-memory-gb", help="Memory of the card to train on, GB: the batch sizes "
                                                  "follow it (default: the visible CUDA card's, else a 2 GB CPU budget; the reason is in plans.json)."),
):
    """Check the raw dataset, fingerprint it, write plans.json and preprocess every training case."""
    from spineauto.cli_views import plan_summary, stage_progress
    from spineauto.plan_and_preprocess import plan_and_preprocess as run

    with stage_progress(console) as progress:
        result = run(dataset, verify=not no_verify, preset=preset, workers=num_processes, progress=progress, gpu_memory_gb=gpu_memory_gb)
    plan_summary(console, result)


@convert_app.command("bids")
def convert_bids(
    root: Path = typer.Argument(..., help="BIDS root (sub-*/anat/*.nii.gz, masks under derivatives/labels)."),
    dataset: int = typer.Option(..., "-d", "--dataset", help="New dataset id (1-999)."),
    name: str = typer.Option(..., "--name", help="Dataset name, e.g. SpineGeneric."),
    label: Optional[List[str]] = typer.Option(None, "--label", help="NAME=SUFFIX, repeatable, e.g. --label cord=seg-manual --label "
                                              "lesion=lesion-manual: masks <image>_<SUFFIX>.nii.gz become one label map, values 1, 2, ... in "
                                              "the order given. The first is the base every training image needs; each later 0/1 mask is "
                                              "painted over it, so a lesion voxel outside the cord mask is kept as lesion. A training image "
                                              "without a later mask has none of that label (logged per case)."),
    label_suffix: Optional[str] = typer.Option(None, "--label-suffix", help="One mask suffix (default seg-manual), the shorthand for --label cord=SUFFIX; "
                                               "not with --label."),
    label_names: Optional[str] = typer.Option(None, "--label-names", help="Names of the values 1, 2, ... of one multi-valued mask, "
                                              "e.g. cord,lesion (without it values above 1 are named label_<k>, with a warning)."),
    contrast: Optional[List[str]] = typer.Option(None, "--contrast", help="Only these contrasts (repeatable): T2w, T1w, ..."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing dataset of that name."),
):
    """Convert a BIDS dataset (spine-generic convention) into Dataset<ID>_<NAME>; label names with "lesion" become lesion_labels."""
    from spineauto import paths
    from spineauto.datasets.bids import convert_bids as run

    out = run(root, paths.root("raw") / paths.dataset_name(dataset, name), label_suffix=label_suffix, labels=label,
              label_names=label_names, contrasts=contrast or None, overwrite=overwrite)
    console.print(f"[green]wrote[/] {escape(str(out))}")


@convert_app.command("dicom")
def convert_dicom(
    root: Path = typer.Argument(..., help="Folder searched recursively for DICOM series (and their DICOM-SEG, RTSTRUCT or NIfTI masks)."),
    dataset: int = typer.Option(..., "-d", "--dataset", help="New dataset id (1-999)."),
    name: str = typer.Option(..., "--name", help="Dataset name."),
    classes_from: Optional[Path] = typer.Option(None, "--classes-from", help="Rules file (YAML): head -> class -> {DICOM keyword: "
                                                "regular expression}; each series gets the class whose rules match its header."),
    label_name: str = typer.Option("cord", "--label-name", help="Name of value 1 of NIfTI masks beside a series (DICOM-SEG and RTSTRUCT masks name their segments and ROIs)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing dataset of that name."),
):
    """Convert every DICOM series under ROOT into a case of Dataset<ID>_<NAME>: with a mask (a DICOM-SEG or RTSTRUCT referencing it, or the
    NIfTI file in its folder) and/or classes from --classes-from to imagesTr/labelsTr, else to imagesTs; prints what each series got and why."""
    from spineauto import paths
    from spineauto.cli_views import dicom_summary
    from spineauto.datasets.dicom import convert_dicom_dataset as run

    dicom_summary(console, run(root, paths.root("raw") / paths.dataset_name(dataset, name), label_name=label_name,
                               overwrite=overwrite, classes_from=classes_from))


@convert_app.command("images")
def convert_images(
    root: Path = typer.Argument(..., help="Folder of PNG/JPEG images, one subfolder per class (or train/ and test/ each with class folders)."),
    dataset: int = typer.Option(..., "-d", "--dataset", help="New dataset id (1-999)."),
    name: str = typer.Option(..., "--name", help="Dataset name."),
    head: str = typer.Option("class", "--head", help="Name of the classification head the folder names are classes of."),
    rgb: bool = typer.Option(False, "--rgb", help="Keep three colour channels (default: grey-scale)."),
    spacing: float = typer.Option(1.0, "--spacing", help="Pixel size in mm."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing dataset of that name."),
):
    """Convert 2D images (one folder per class) into a classification dataset, e.g. for encoder pretraining."""
    from spineauto import paths
    from spineauto.datasets.image_folder import convert_image_folder as run

    out = run(root, paths.root("raw") / paths.dataset_name(dataset, name), head=head, rgb=rgb, spacing=spacing, overwrite=overwrite)
    console.print(f"[green]wrote[/] {escape(str(out))}")


@convert_app.command("pairs")
def convert_pairs(
    images: Path = typer.Argument(..., help="Folder of images (.nii.gz, .nii, .nrrd, .mha, .png, .bmp, .tif; one format)."),
    masks: Path = typer.Argument(..., help="Folder of masks named as their images (any of those formats; written in the image's)."),
    dataset: int = typer.Option(..., "-d", "--dataset", help="New dataset id (1-999)."),
    name: str = typer.Option(..., "--name", help="Dataset name."),
    label: Optional[List[str]] = typer.Option(None, "--label", help="NAME=VALUE, repeatable, e.g. --label cord=1 --label lesion=2 "
                                              "(default: the values found, one of them 'foreground')."),
    mask_suffix: str = typer.Option("", "--mask-suffix", help="Masks are named <image stem><SUFFIX>, e.g. _mask."),
    spacing: Optional[float] = typer.Option(None, "--spacing", help="Pixel size in mm of 2D pictures (.png/.bmp/.tif; default 1)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing dataset of that name."),
):
    """Pair IMAGES/x with MASKS/x by name into Dataset<ID>_<NAME>: pairs to imagesTr/labelsTr, images without a mask to imagesTs."""
    from spineauto import paths
    from spineauto.cli_views import pairs_summary
    from spineauto.datasets.pairs import convert_pairs as run, parse_labels

    report = run(images, masks, paths.root("raw") / paths.dataset_name(dataset, name), labels=parse_labels(label),
                 mask_suffix=mask_suffix, pixel_spacing=spacing, overwrite=overwrite)
    pairs_summary(console, report)


@convert_app.command("sparse")
def convert_sparse(
    wide: Path = typer.Argument(..., help="The uncropped scan (NIfTI), e.g. a whole-neck field of view."),
    mask: Path = typer.Argument(..., help="The mask (any value > 0) of a cropped scan of the same session, on the crop's grid."),
    dataset: str = typer.Option(..., "-d", "--dataset", help="The raw dataset (id or name) the case is added to: one channel, NIfTI."),
    case: str = typer.Option(..., "--case", help="Name of the new training case, e.g. t2s_uncropped."),
    margin_mm: float = typer.Option(15.0, "--margin-mm", help="In-plane distance (mm) from the carried mask within which nothing "
                                    "is labelled (ignore); background beyond. At least the headers' misalignment (check with --overlay)."),
    uncovered: str = typer.Option("nearest", "--uncovered", help="Slices the mask does not reach: 'nearest' ignores the margin around "
                                  "the carried mask of the nearest slice it reaches, 'ignore' the whole slice."),
    overlay: Optional[Path] = typer.Option(None, "--overlay", help="Also draw the labels over the scan's slices into this .png (look before training)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a case of that name."),
):
    """Add a whole-field-of-view scan to a raw dataset as a sparsely labelled case: the cropped scan's mask carried through the
    affines, background farther than --margin-mm from it, nnU-Net's 'ignore' label near it (declared in dataset.json, the
    highest value, when absent). Nothing is labelled as the structure itself: the case teaches where it is not."""
    from spineauto import paths
    from spineauto.datasets.sparse import add_sparse_case

    r = add_sparse_case(paths.raw_dataset(dataset), wide, mask, case, margin_mm=margin_mm, uncovered=uncovered, overwrite=overwrite,
                        overlay=overlay)
    console.print(f"[green]wrote[/] {escape(str(r.image))} and {escape(str(r.label))}: {r.covered} of {r.slices} slices reached by "
                  f"the mask, {100 * r.background_share:.1f}% background, {100 * r.ignore_share:.1f}% ignore (value {r.ignore_label})")


@app.command("pretrain")
def pretrain(
    sources: List[Path] = typer.Argument(..., help="Supervised: one class-folder tree (ROOT/<class>/.../<image>). Self-supervised: any "
                                         "number of raw datasets (Dataset001_X: imagesTr + imagesTs), image folders or image files."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for shards/ (converted images), checkpoint_final.pt and pretrain_history.json."),
    self_supervised: bool = typer.Option(False, "--self-supervised", help="SimCLR on unlabeled images: every slice of every volume (labels ignored)."),
    class_depth: Optional[int] = typer.Option(None, "--class-depth", help="Supervised: the first K folder levels name the class "
                                              "(e.g. 2 for modality/anatomy/...); default: the leaf folders."),
    depth: int = typer.Option(18, "--depth", help="ResNet depth: 18, 34 or 50 (the plan's network.depth downstream)."),
    size: int = typer.Option(128, "--size", help="Images are stored SIZE x SIZE: the longer side resized to SIZE, the other zero-padded."),
    channels: int = typer.Option(1, "--channels", help="1 (grey: colour -> luminance) or 3 (grey repeated); the downstream plan's channels."),
    epochs: int = typer.Option(10, "--epochs"),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per step and process (SimCLR contrasts 2 views of each, across all processes)."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak AdamW learning rate (linear warm-up over 5 % of the steps, then cosine decay)."),
    max_iters: Optional[int] = typer.Option(None, "--iters-per-epoch", help="Cap the iterations of an epoch (default: every image once)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="Mixed precision (default: on for CUDA)."),
    num_workers: int = typer.Option(2, "--num-workers", help="Data loader workers."),
    num_processes: int = typer.Option(min(os.cpu_count() or 1, 8), "-np", "--num-processes", help="Parallel conversion processes."),
    shard_size: int = typer.Option(8192, "--shard-size", help="Images per shard file."),
    strict: bool = typer.Option(False, "--strict", help="Refuse the sources when any image is unreadable (default: skip and list them in shards/index.json)."),
    convert_only: bool = typer.Option(False, "--convert-only", help="Only convert (or finish converting) the images into shards."),
    continue_training: bool = typer.Option(False, "--continue", help="Resume the pretraining from checkpoint_latest.pt."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace earlier shards of other images/settings and an earlier pretraining."),
    seed: int = typer.Option(0, "--seed"),
    num_gpus: int = typer.Option(1, "--num-gpus", help="DDP processes: relaunches this command through torchrun."),
):
    """Stage 1: pretrain a ResNet encoder on many 2D images, then `spineauto train --pretrained OUT/checkpoint_final.pt`.

    Images are converted once into a few memory-mapped shards (in parallel; an interrupted conversion
    resumes where it stopped). Supervised: classes from the folders. Self-supervised: SimCLR (lightly).
    The encoder transfers into any configuration whose network is resnet/resnet_unet of the same --depth.
    """
    if num_gpus > 1:
        from spineauto.training.distributed import relaunch_with_torchrun

        argv = [a for i, a in enumerate(sys.argv[1:]) if not a.startswith("--num-gpus") and sys.argv[i] != "--num-gpus"]
        raise typer.Exit(relaunch_with_torchrun(num_gpus, argv))
    from spineauto.cli_views import case_progress, make_progress
    from spineauto.pretraining.run import run_pretrain
    from spineauto.pretraining.shards import describe
    from spineauto.pretraining.train import PretrainOptions

    options = PretrainOptions(depth=depth, epochs=epochs, batch_size=batch_size, lr=lr, device=device, amp=amp, num_workers=num_workers,
                              seed=seed, max_iters_per_epoch=max_iters, continue_training=continue_training, overwrite=overwrite)
    with make_progress(console) as progress:
        bar = {}

        def step(done: int, total: int, text: str) -> None:
            if "id" not in bar:
                bar["id"] = progress.add_task(text, total=total)
            progress.update(bar["id"], completed=done, description=text)

        options.progress = step
        index, checkpoint = run_pretrain(sources, output, options, self_supervised=self_supervised, class_depth=class_depth, size=size,
                                         channels=channels, shard_size=shard_size, workers=num_processes, strict=strict,
                                         convert_only=convert_only, convert_progress=case_progress(progress, "converting"))
    if os.environ.get("RANK", "0") != "0":  # DDP: rank 0 reports
        return
    console.print(f"[green]shards[/] {escape(str(output / 'shards'))}: {escape(str(describe(index)))}")
    if checkpoint is not None:
        console.print(f"[green]pretrained[/] {escape(str(checkpoint))}; use it with `spineauto train ... --pretrained {escape(str(checkpoint))}` on a plan "
                      f"whose network is resnet_unet/resnet, depth {depth}", soft_wrap=True)


@_command("train")
def train(
    dataset: str = DatasetOpt,
    fold: str = typer.Option(..., "-f", "--fold", help="Cross-validation fold 0..4, or 'all' (train on every case)."),
    configuration: str = typer.Option("2d", "-c", "--configuration", help="Configuration of plans.json (2d, cls, multitask, ...)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Override the plan's epochs (recorded in fold_k/config.json)."),
    iters_per_epoch: Optional[int] = typer.Option(None, "--iters-per-epoch", help="Override the plan's iterations per epoch."),
    val_iters: Optional[int] = typer.Option(None, "--val-iters", help="Override the plan's validation iterations per epoch."),
    continue_training: bool = typer.Option(False, "--continue", help="Resume from fold_k/checkpoint_latest.pt (or, when it is "
                                           "unreadable, from the newest intact checkpoint)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the fold's earlier run (without it, a fold with checkpoints is "
                                   "refused); the old run is kept in previous_fold_k/ until the new run writes its first checkpoint."),
    allow_stale_data: bool = typer.Option(False, "--allow-stale-data", help="Train although raw training cases were removed, added or "
                                           "edited since plan_and_preprocess (default: refuse, naming them; rerunning plan_and_preprocess "
                                           "redoes only those cases)."),
    pretrained: Optional[Path] = typer.Option(None, "--pretrained", help="Checkpoint whose matching encoder.* (and other) tensors initialise the network."),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="Mixed precision (default: on for CUDA fp16; on CPU bf16 where the CPU has it natively, AMX/AVX512-BF16, else off)."),
    amp_dtype: Optional[str] = typer.Option(None, "--amp-dtype", help="float16 (CUDA, with grad scaling) or bfloat16."),
    wandb: str = typer.Option("auto", "--wandb", help="auto (online with credentials, else offline), online, offline, disabled."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default 0, or the run's own with --continue)."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Background data workers (default from the CPU count)."),
    num_gpus: int = typer.Option(1, "--num-gpus", help="DDP processes (per node): relaunches this command through torchrun (gloo on CPU, NCCL on CUDA)."),
    nnodes: int = typer.Option(1, "--nnodes", help="Machines in the job: run this same command on each of them, with --rdzv-endpoint (see README, SLURM)."),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT where the nodes meet (torchrun's c10d rendezvous), e.g. the first node and 29500."),
    rdzv_id: Optional[str] = typer.Option(None, "--rdzv-id", help="Job id shared by the nodes (default $SLURM_JOB_ID, else 'spineauto')."),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last", help="NHWC memory format (default: on for CUDA, off on CPU)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the network (falls back to eager when compiling fails; the first step's time is logged)."),
    no_validate: bool = typer.Option(False, "--no-validate", help="Skip the full-volume validation of the held-out cases."),
    npz: bool = typer.Option(False, "--npz", help="Also save the validation's probabilities (validation/<case>.npz) so that "
                             "find_best_configuration can score ensembles of configurations."),
    config: Optional[Path] = typer.Option(None, "--config", help="Run YAML overriding the plan's train-time values (network, loss, optim, "
                                          "augmentation, batch_size, trainer: callbacks, loggers, accumulate ...; plans/runs/example_run.yaml) "
                                          "or a preset of plans/; resolved into fold_k/run_config.yaml."),
    batch_size: Optional[str] = typer.Option(None, "--batch-size", metavar="INT", help="Override the plan's batch size."),
    lr: Optional[str] = typer.Option(None, "--lr", metavar="FLOAT", help="Override optim.initial_lr."),
    config_set: Optional[List[str]] = typer.Option(None, "--config-set", metavar="KEY=VALUE", help="Override one plan value by its dotted "
                                                   "key, repeatable: --config-set loss.name=focal_tversky --config-set trainer.accumulate=2."),
    logger: Optional[List[str]] = typer.Option(None, "--logger", help="Another experiment logger beside W&B: tensorboard (fold_k/tensorboard)."),
    wandb_artifacts: bool = typer.Option(False, "--wandb-artifacts", help="Upload the best and final checkpoints as a W&B artifact."),
    overrides: Optional[List[str]] = typer.Argument(None, metavar="[KEY=VALUE]...", help="More dotted overrides, as --config-set "
                                                    "(what a `wandb agent` passes with ${args_no_hyphens})."),
):
    """Train one fold of a configuration from its plan (overridden by --config, flags and KEY=VALUE); checkpoints, metrics and validation in the model folder."""
    if num_gpus > 1 or nnodes > 1:
        from spineauto.training.distributed import relaunch_with_torchrun

        raise typer.Exit(relaunch_with_torchrun(num_gpus, sys.argv[1:], nnodes, rdzv_endpoint, rdzv_id))
    from spineauto.cli_views import TrainingBar
    from spineauto.training.trainer import TrainOptions, train_fold

    options = TrainOptions(epochs=epochs, iters_per_epoch=iters_per_epoch, val_iters=val_iters, device=device, amp=amp,
                           amp_dtype=amp_dtype, channels_last=channels_last, compile=compile, wandb=wandb, seed=seed, continue_training=continue_training, overwrite=overwrite,
                           allow_stale_data=allow_stale_data, pretrained=pretrained, num_workers=num_workers, validate=not no_validate, save_probabilities=npz,
                           progress=TrainingBar(console), config=config, batch_size=batch_size, lr=lr,
                           config_set=[*(config_set or []), *(overrides or [])], loggers=list(logger or []), wandb_artifacts=wandb_artifacts)
    folder = train_fold(dataset, configuration, fold, options)
    console.print(f"[green]trained[/] {escape(str(folder))}")


_EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": False}


@_command("predict", context_settings=_EXTRA_ARGS)
def predict(
    ctx: typer.Context,
    dataset: Optional[str] = typer.Option(None, "-d", "--dataset", help="Dataset id (1) or folder name (Dataset001_Name) whose model to use; not needed with -m."),
    input: Path = typer.Option(..., "-i", "--input", help="Folder of image files (<case>_0000.nii.gz or <case>.nii.gz; .nrrd, .mha, .png ... alike), one image file, or a folder of DICOM series."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder for the masks (in each input's format; DICOM input: <case>.nii.gz)."),
    configuration: str = typer.Option("2d", "-c", "--configuration", help="Trained configuration."),
    folds: Optional[List[str]] = typer.Option(None, "-f", "--folds", help="Folds to ensemble (repeat or list: -f 0 1 2, or 'all'); default every trained fold."),
    checkpoint: str = typer.Option("final", "--checkpoint", help="best, final or latest."),
    no_tta: bool = typer.Option(False, "--no-tta", help="No mirroring test-time augmentation (faster)."),
    save_probabilities: bool = typer.Option(False, "--save-probabilities", help="Also write <case>.npz probabilities (for `spineauto ensemble`)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    model_folder: Optional[Path] = typer.Option(None, "-m", "--model", help="Use this model folder instead of the one of -d/-c."),
    roi: Optional[Path] = typer.Option(None, "--roi", help="Folder of <case>.nii.gz masks (value > 0) to crop around, for a configuration with an roi (2d_cord_roi: the cord masks of another `spineauto predict`)."),
    num_parts: int = typer.Option(1, "--num-parts", help="Split the cases into this many shards (e.g. a SLURM job array's size)."),
    part_id: int = typer.Option(0, "--part-id", help="Which shard this run predicts, 0 .. num-parts-1 (e.g. $SLURM_ARRAY_TASK_ID); outputs merge by copying."),
    dicom_seg: bool = typer.Option(False, "--dicom-seg", help="DICOM input: also write <case>.seg.dcm, a DICOM-SEG referencing the source series."),
):
    """Segment new scans with a trained model; masks keep each input's exact geometry."""
    import torch

    from spineauto import paths
    from spineauto.cli_views import case_progress, make_progress, predict_summary
    from spineauto.devices import resolve_device
    from spineauto.inference.model import load_model
    from spineauto.inference.predict import predict_folder

    from spineauto.parallel import shard

    shard([], num_parts, part_id)  # check the shard options before loading any model
    folds = _split_folds(folds)
    if ctx.args:  # nnU-Net style `-f 0 1 2`: the values after the first arrive as extra arguments
        if not folds or not all(a.isdigit() or a == "all" for a in ctx.args):
            raise SpineautoError(f"unexpected argument(s) {' '.join(ctx.args)}; folds go after -f (e.g. -f 0 1 2 or -f all)")
        folds += ctx.args
    torch.backends.cudnn.benchmark = True  # every forward pass has the same tile shape
    if model_folder is None and dataset is None:
        raise SpineautoError("predict needs a model: -d DATASET (its trained -c configuration) or -m MODEL_FOLDER")
    folder = Path(model_folder) if model_folder else paths.model_folder(dataset, configuration)
    model = load_model(folder, folds, checkpoint, resolve_device(device), configuration=configuration)
    with make_progress(console) as progress:
        result = predict_folder(model, input, output, tta=not no_tta, save_probabilities=save_probabilities,
                                progress=case_progress(progress, "predict"), roi=roi, num_parts=num_parts, part_id=part_id,
                                dicom_seg=dicom_seg)
    predict_summary(console, model, result, output, not no_tta)


def _split_folds(folds: Optional[List[str]]) -> Optional[List[str]]:
    return [f for item in folds for f in item.replace(",", " ").split()] if folds else None


@_command("ensemble", context_settings=_EXTRA_ARGS)
def ensemble(
    ctx: typer.Context,
    inputs: List[Path] = typer.Option(..., "-i", "--input", help="Folders of <case>.npz probabilities (repeat -i or list them)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder for <case>.nii.gz masks."),
    save_probabilities: bool = typer.Option(False, "--save-probabilities", help="Also write the averaged <case>.npz."),
    postprocessing: Optional[Path] = typer.Option(None, "--postprocessing", help="postprocessing.json to apply to the ensembled masks."),
):
    """Average saved probabilities of several models (configurations or trainings) and write masks."""
    from spineauto.cli_views import case_progress, make_progress
    from spineauto.inference.ensemble import ensemble_folders
    from spineauto.inference.postprocessing import load_postprocessing

    pp = load_postprocessing(postprocessing) if postprocessing is not None else None
    with make_progress(console) as progress:
        written = ensemble_folders([*inputs, *map(Path, ctx.args)], output, save_probabilities, pp,
                                   progress=case_progress(progress, "ensemble"))
    console.print(f"[green]wrote[/] {len(written)} ensembled mask(s) to {escape(str(output))}")


@_command("evaluate")
def evaluate(
    pred_dir: Path = typer.Argument(..., help="Folder of predicted <case>.nii.gz."),
    gt_dir: Path = typer.Argument(..., help="Folder of ground-truth <case>.nii.gz (e.g. labelsTs), or for classification a labels file: dataset.json (its cases' classes) or a CSV case,head,class."),
    dataset: Optional[str] = typer.Option(None, "-d", "--dataset", help="Dataset id or name: labels and lesion labels from its dataset.json."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="summary.json to write (a .csv is written beside it); default PRED_DIR/summary.json."),
    ignore_label: Optional[int] = typer.Option(None, "--ignore-label", help="Reference voxels of this value are unlabelled and count in no "
                                               "metric (default: the dataset's 'ignore' label with -d, nnU-Net's sparse labels)."),
):
    """Dice, IoU, HD95, ASD, volume difference per label; lesion-wise detection for lesion labels."""
    from rich.console import Console

    from spineauto.cli_views import case_progress, evaluation_table, make_progress
    from spineauto.evaluation.evaluate import check_summary_target, dataset_labels, evaluate_folders, with_ignore, write_summary

    if Path(gt_dir).is_file():  # a labels file (dataset.json cases, or CSV case,head,class): classification
        from spineauto.evaluation.classification import evaluate_prediction_folder, print_report

        out_dir = Path(output).parent if output else Path(pred_dir)
        check_summary_target(out_dir / "summary_classification.json", gt_dir)
        print_report(console, evaluate_prediction_folder(pred_dir, gt_dir, out_dir=out_dir), out_dir / "summary_classification.json")
        return
    labels = dataset_labels(dataset) if dataset else None
    if ignore_label is not None:
        labels = with_ignore(labels, ignore_label)
    check_summary_target(output or Path(pred_dir) / "summary.json", gt_dir)
    with make_progress(console) as progress:
        summary = evaluate_folders(pred_dir, gt_dir, labels, progress=case_progress(progress, "evaluate"))
    json_path, csv_path = write_summary(summary, output or Path(pred_dir) / "summary.json")
    Console(width=max(120, Console().width)).print(evaluation_table(summary))
    console.print(f"[green]wrote[/] {escape(str(json_path))} and {escape(str(csv_path))}")


@_command("find_best_configuration")
def find_best_configuration(
    dataset: str = DatasetOpt,
    configurations: Optional[List[str]] = typer.Option(None, "-c", "--configurations", help="Only these configurations (default: every trained one)."),
    no_ensembles: bool = typer.Option(False, "--no-ensembles", help="Do not try ensembles of configurations."),
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="Rank even when folds or validation cases of "
                                          "splits_final.json are missing (default: refuse), on the cases validated so far."),
):
    """Compare trained configurations and their ensembles on the cross-validation; print the predict command."""
    from rich.console import Console

    from spineauto.cli_views import best_configuration_table
    from spineauto.evaluation.best_configuration import find_best_configuration

    result = find_best_configuration(dataset, _split_folds(configurations), not no_ensembles, allow_incomplete=allow_incomplete)
    out = Console()
    out.print(best_configuration_table(result))
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(str(note))}", highlight=False, soft_wrap=True)
    for line in result.cases_used:
        out.print(f"cases used: {line}", highlight=False, soft_wrap=True)
    out.print("predict with:")
    for cmd in result.commands:
        out.print(f"  {cmd}", highlight=False, soft_wrap=True)


@app.command("demo")
def demo(
    workdir: Path = typer.Option(Path("spineauto_demo"), "--workdir", help="Folder for the demo's raw, preprocessed and results data."),
    cases: int = typer.Option(16, "--cases", min=1, help="Number of synthetic training cases."),
    epochs: int = typer.Option(10, "--epochs", min=1, help="Training epochs of the demo model."),
    iters_per_epoch: int = typer.Option(25, "--iters-per-epoch", min=1, help="Training iterations per epoch."),
    seed: int = typer.Option(0, "--seed"),
    lesion_iters: int = typer.Option(300, "--lesion-iters", min=0, help="Training iterations of the lesion stage (2d_cord_roi: "
                                     "lesions in boxes around the predicted cord); 0 skips it."),
    pipeline: bool = typer.Option(False, "--pipeline", help="The whole product: train a small model per pipeline stage, "
                                  "write the pipeline YAML and run `spineauto pipeline` with its HTML report (about 10-15 min on 2 CPU cores)."),
):
    """Generate synthetic spine phantoms, then plan, train fold 0, predict the held-out phantoms and evaluate;
    then the lesion stage of the cord -> lesion cascade the same way."""
    from spineauto.demo import run_demo, run_pipeline_demo

    def run(*args: str) -> None:
        console.rule("spineauto " + " ".join(args))
        typer.main.get_command(app).main(list(args), prog_name="spineauto", standalone_mode=False)

    if pipeline:
        run_pipeline_demo(run, workdir, seed=seed, console=console)
    else:
        run_demo(run, workdir, n_train=cases, seed=seed, epochs=epochs, iters_per_epoch=iters_per_epoch, lesion_iters=lesion_iters,
                 console=console)


@_command("pipeline")
def pipeline(
    input: Path = typer.Option(..., "-i", "--input", help="A NIfTI file, a folder of them, a folder of DICOM series, or a BIDS root."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder: one <case>/ folder per case, pipeline.csv and report.html."),
    config: Path = typer.Option(..., "--config", help="Pipeline definition (YAML, see plans/pipelines/) or a pipeline bundle (.zip from `spineauto export --pipeline`)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    num_parts: int = typer.Option(1, "--num-parts", help="Split the cohort into this many shards (e.g. a SLURM job array's size)."),
    part_id: int = typer.Option(0, "--part-id", help="Which shard this run processes, 0 .. num-parts-1 (e.g. $SLURM_ARRAY_TASK_ID)."),
):
    """Run the whole spine pipeline on new scans: classify, segment the cord, segment lesions in it, measure, report.

    Every model is loaded once; each case is read once. Masks keep each input's exact geometry.
    A case is "done" only when no quality check flagged it, else "check" with the reasons (pipeline.csv,
    report.html). A case whose stage fails keeps what the stages before found and says which stage
    failed; the exit code is 1 when any case failed.
    """
    from spineauto.cli_views import case_progress, make_progress
    from spineauto.pipeline.cohort import check_output_apart, run_pipeline, shard, summary_line
    from spineauto.pipeline.runner import Pipeline

    shard([], num_parts, part_id)  # check the shard options before loading any model
    check_output_apart(input, output)
    if not Path(input).exists():
        raise SpineautoError(f"{input}: input not found; pass a NIfTI file, a folder of them, a DICOM folder or a BIDS root")
    pipe = Pipeline.load(config, device=device)
    with make_progress(console) as progress:
        result = run_pipeline(pipe, input, output, num_parts, part_id, progress=case_progress(progress, "pipeline"))
    console.print(f"[green]wrote[/] {escape(str(summary_line(result, output)))}")
    if result.failed:
        first = next(iter(result.failed.items()))
        raise SpineautoError(f"{len(result.failed)} case(s) failed (first: {first[0]}: {first[1]}); the others are in {output}")


@app.command("report")
def report(output: Path = typer.Argument(..., help="A `spineauto pipeline` output folder (or several shards' folders merged into one).")):
    """Rebuild report.html and pipeline.csv from the case JSONs of a pipeline output folder."""
    from spineauto.pipeline.report import build_report

    if not Path(output).is_dir():
        raise SpineautoError(f"{output}: not a folder; pass the -o folder of `spineauto pipeline`")
    console.print(f"[green]wrote[/] {escape(str(build_report(output, require_cases=True)))}")


@app.command("export")
def export(
    output: Path = typer.Option(..., "-o", "--output", help="The bundle to write (.zip)."),
    model_folder: Optional[Path] = typer.Option(None, "-m", "--model", help="A trained model folder to bundle."),
    dataset: Optional[str] = typer.Option(None, "-d", "--dataset", help="Or the dataset whose configuration -c to bundle."),
    configuration: str = typer.Option("2d", "-c", "--configuration", help="With -d: the trained configuration."),
    folds: Optional[List[str]] = typer.Option(None, "-f", "--folds", help="Folds to include (default every trained fold)."),
    checkpoint: str = typer.Option("final", "--checkpoint", help="best, final or latest."),
    pipeline_config: Optional[Path] = typer.Option(None, "--pipeline", help="Bundle a whole pipeline: this YAML and every model it names."),
):
    """Write a trained model (or a pipeline with its models) as one zip that predict/pipeline take on another machine."""
    from spineauto import paths
    from spineauto.pipeline.bundle import export_model, export_pipeline

    if pipeline_config is not None:
        written = export_pipeline(pipeline_config, output)
    else:
        if (model_folder is None) == (dataset is None):
            raise SpineautoError("export: give -m MODEL_FOLDER or -d DATASET [-c CONFIGURATION] (or --pipeline P.yaml)")
        folder = model_folder or paths.model_folder(dataset, configuration)
        written = export_model(folder, output, _split_folds(folds), checkpoint)
    console.print(f"[green]wrote[/] {escape(str(written))}")


class Terminated(SystemExit):
    """SIGTERM, raised where the process was (see :func:`exit_on_sigterm`)."""


def exit_on_sigterm() -> None:
    """SIGTERM (``kill``, ``timeout``, a scheduler) unwinds as an interrupt does: ``finally`` blocks and exit
    handlers run, so temporary files and unpacked bundles are removed instead of left behind; ``main``
    then ends the process by the signal, as its caller expects."""
    import signal

    def _exit(signum, frame):
        raise Terminated(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def _die_of_sigterm() -> None:
    import atexit
    import signal

    atexit._run_exitfuncs()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    # OpenMP threads that sleep instead of spinning. It must be set before torch starts OpenMP (any
    # command may import it first): on a busy CPU (data workers, forked preprocessing workers, other
    # jobs) spinning threads made a training step up to 10x slower; idle cost is microseconds per op.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    exit_on_sigterm()
    try:
        app()
    except Terminated:
        _die_of_sigterm()
    except SpineautoError as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except OSError as e:  # what no command turned into its own line: the path and the cause
        from spineauto.errors import os_error_line

        console.print(f"[bold red]error:[/] {escape(str(os_error_line(e)))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except MemoryError as e:  # an allocation no check foresaw: the cause in one line, not a traceback
        reason = " ".join(str(e).split())[:300] or "an allocation failed"
        console.print(f"[bold red]error:[/] out of memory ({escape(reason)}); use smaller images, patches or batches, or a "
                      "machine with more memory", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
