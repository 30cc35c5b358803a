"""Train or finetune a NanoVLM. Wiring only: every step lives in the `nanovlm` package.

Embedded demo (tiny random-init model, locally trained tokenizer, synthetic data; 2 CPU cores, a few minutes):
    python train_accelerate.py --config configs/train/demo.yaml

The original nanoVLM recipe (SigLIP2-B/16-512 + SmolLM2-360M-Instruct on FineVision) on 8 GPUs:
    accelerate launch --config_file configs/accelerate/8gpu.yaml train_accelerate.py \
        --config configs/train/nanovlm_460m.yaml

Two CPU processes (gloo), e.g. to check distributed behaviour without a GPU:
    torchrun --nproc_per_node 2 train_accelerate.py --config configs/train/demo.yaml --max_steps 20

Any YAML key can be overridden on the command line (`--lr_mp 0.001`); `--resume_from_checkpoint true` resumes
from the last complete checkpoint in `--output_dir` (a run that already reached `--max_steps` is left as it is).
"""

from __future__ import annotations

import logging
import os
import sys

from transformers import set_seed

from nanovlm.data.packing import NoSamplesError
from nanovlm.training.build import (
    build_datasets,
    build_model_and_processor,
    check_attention_device,
    check_fsdp_device,
    configure_reporting,
    data_position_settings,
    load_rows,
    prepare_synthetic_dataset,
)
from nanovlm.training.checkpoints import check_resume_checkpoint, completed_step
from nanovlm.training.errors import NonFiniteLossError, UsageError, one_line
from nanovlm.training.parser import parse_args
from nanovlm.training.plots import plot_training_curves
from nanovlm.training.reports import report_synthetic_accuracy
from nanovlm.training.trainer import NanoVLMTrainer

logger = logging.getLogger("nanovlm")


def main(argv: list[str] | None = None) -> dict:
    try:
        model_args, data_args, training_args = parse_args(argv)
    except (ValueError, FileNotFoundError) as err:  # a bad command line: the message, not a traceback
        raise SystemExit(f"train_accelerate.py: error: {err}") from None
    # INFO on each node's first process only, as transformers' own logs (`should_log`): every rank logs the same
    # data and optimizer lines, so under torchrun each appeared once per process; the others keep warnings.
    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    resume = training_args.resume_from_checkpoint
    check_resume_checkpoint(resume)
    done = completed_step(training_args.output_dir, resume, training_args.max_steps)
    if done is not None:  # resuming would train an extra step and overwrite final/: leave the run as it is
        if training_args.process_index == 0:
            print(f"train_accelerate.py: the run in {training_args.output_dir} is already complete at step {done} "
                  f"(--max_steps {training_args.max_steps}); nothing changed. Raise --max_steps to train further.")
        return {"completed_step": done}
    set_seed(training_args.seed)
    check_fsdp_device(training_args)
    check_attention_device(model_args, training_args)
    configure_reporting(model_args, data_args, training_args)
    if training_args.lmms_eval_tasks:  # an unknown task: one line now, not a KeyError in every evaluation's log
        from nanovlm.training.callbacks import check_lmms_eval_tasks

        check_lmms_eval_tasks(training_args)

    prepare_synthetic_dataset(data_args, training_args)
    train_rows, eval_rows = load_rows(data_args, training_args)
    model, processor = build_model_and_processor(model_args, train_rows)
    if training_args.use_lora:
        from nanovlm.training.lora import apply_lora

        model = apply_lora(model, training_args)
    train_dataset, eval_dataset, collator = build_datasets(
        data_args, training_args, processor, train_rows, eval_rows, model_config=model.config
    )

    trainer = NanoVLMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
    )
    trainer.card_info["dataset"] = data_args.dataset_name_or_path
    trainer.run_settings = data_position_settings(model_args, data_args, training_args)  # checked on resume
    if training_args.lmms_eval_tasks:  # lmms-eval on saved checkpoints, in the background (sbatch or a local process)
        from nanovlm.training.callbacks import LmmsEvalCallback

        synthetic = data_args.dataset_name_or_path if data_args.synthetic_dataset else None  # the tasks' data
        trainer.add_callback(LmmsEvalCallback.from_args(training_args, synthetic_data=synthetic))
    trainer.train(resume_from_checkpoint=True if str(resume).lower() == "true" else resume)

    final_dir = os.path.join(training_args.output_dir, "final")
    results = {"final_model": final_dir}
    if data_args.synthetic_dataset:  # on the best model (load_best_model_at_end), which is what gets saved; in
        # every process: lmms-eval shares the test questions among them (one process alone waits for the others)
        results.update(report_synthetic_accuracy(trainer.model, processor, data_args, training_args))
    if trainer.is_world_process_zero():
        results["plots"] = plot_training_curves(trainer.state.log_history, training_args.output_dir)
    trainer.set_results(results)  # OUTPUT_DIR/results.json, and the accuracy tables on the model card
    trainer.save_model(final_dir)  # with the processor, training_info.json and the model card
    if training_args.push_to_hub or training_args.hub_model_id:
        trainer.push_to_hub()  # the final (best) model, its processor, code files and card
    if "test_accuracy_error" in results:  # the model is saved; the run still failed: its promise is the table
        raise SystemExit(
            f"train_accelerate.py: error: the held-out evaluation failed: {results['test_accuracy_error']} "
            f"(the trained model is saved in {final_dir})"
        )
    return results


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (UsageError, NonFiniteLossError, NoSamplesError) as err:  # a setting or data to fix, a diverged run: one
        raise SystemExit(f"train_accelerate.py: error: {one_line(err)}") from None  # line, exit status 1
