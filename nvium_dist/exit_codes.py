"""Exit codes of pretrain/pretrain_nvium.py: the one place they are defined. slurm/pretrain.sbatch requeues a
job whose trainer exited with a code in REQUEUE (and a preempted one that printed its "preempted: " line), never
one that exited with any other code: a config error or a diverged run would fail the same way again."""

OK = 0  # trained to train_iters, or stopped by a signal after saving a checkpoint (or refusing a non-finite one)
ERROR = 1  # an unexpected exception (a traceback)
CONFIG_ERROR = 2  # the config, data or a checkpoint cannot work; the message says what to change
DIVERGED = 3  # still diverging after training.max_rollbacks rollbacks, or no good checkpoint to roll back to
HUNG = 75  # the hang watchdog fired (EX_TEMPFAIL: trying again may work)

REQUEUE = (HUNG,)
