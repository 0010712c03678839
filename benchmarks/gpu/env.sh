# Sourced by the GPU scripts: carried packages and the staged files live outside the repo copy.
export PYTHONPATH=/root/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 T2R_CACHE=/root/stage/t2r-cache TOKENIZERS_PARALLELISM=true
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
t2r() { ${PYTHON:-python3} -m t2r.cli "$@"; }
