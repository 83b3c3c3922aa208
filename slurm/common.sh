# Sourced by the sbatch scripts in this folder: the run directory, NCCL settings, the launch line.
# Everything here can be set in the environment before `sbatch` (sbatch passes it on).

# The run directory is keyed by the job id, which a requeued job keeps: it finds its checkpoints
# there and resumes from the newest complete one (ckpt_path=auto), in the same wandb run.
SD_RUN_ROOT=${SD_RUN_ROOT:-outputs/slurm}
RUN_DIR=${SD_RUN_DIR:-${SD_RUN_ROOT}/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
SD_PYTHON=${SD_PYTHON:-python}

# NCCL (GPU jobs). Defaults that suit InfiniBand/RoCE A100/H100 clusters; see slurm/README.md.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}                       # INFO to see the chosen transports
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead rank fails the job instead of hanging it
export TORCH_NCCL_BLOCKING_WAIT=${TORCH_NCCL_BLOCKING_WAIT:-0}
# export NCCL_SOCKET_IFNAME=ib0       # the interface for NCCL's bootstrap if the default is wrong
# export NCCL_IB_HCA=mlx5             # which InfiniBand adapters to use
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1

echo "sd_lightning: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}:" \
     "${SLURM_NNODES} nodes x ${SLURM_NTASKS_PER_NODE} tasks, run dir ${RUN_DIR}"

# One task per GPU; Lightning reads the ranks and the master address from SLURM's variables.
# --kill-on-bad-exit: one failed rank ends the step instead of leaving the others waiting.
sd_launch() {
    srun --kill-on-bad-exit=1 "${SD_PYTHON}" -m sd_lightning \
        trainer.devices="${SLURM_NTASKS_PER_NODE}" trainer.num_nodes="${SLURM_NNODES}" \
        hydra.run.dir="${RUN_DIR}" "$@"
}
