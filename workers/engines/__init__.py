"""Engine adapters: vllm, trtllm, cpu, sim."""
