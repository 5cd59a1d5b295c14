"""Helpers of `train.py` and `pretrain.py`, kept beside them as torchvision keeps `references/segmentation/utils.py`.
Run from the repository; not part of the installed `segformer` library. One job a file:

    settings.py      typed settings: fields, checks, training_args.json, the command line, the resolution order
    train_config.py  train.py's TrainConfig and its recipes
    data.py          the run's data: the label spec, the checks of every annotation, class weights, the loaders
    loop.py          the loop's state and steps, the meter, the stop, the state saved and restored, exit status
    run_folder.py    the run's folder: its lock, checkpoints written atomically, best/, clean-up after a kill
    distributed.py   processes (torchrun) and random states
    finetune.py      freezing stages, LoRA, per-group learning rates
    evaluation.py    mean IoU over a loader, summed over processes; the report's per-image counts
    eval_only.py     --eval-only: a checkpoint evaluated, with --report, --calibrate, --corruptions
    run_log.py       metrics.jsonl and TensorBoard
    tables.py        the per-class table, confusion matrices and per_class.csv
    plots.py         curves, confusion heatmaps, per-class bars; python -m training.plots RUN [RUN ...]
    eval_report.py   the evaluation report's files and its model-card section
    hub.py           model cards and pushing to the hub
"""
