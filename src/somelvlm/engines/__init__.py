"""Where a batch job runs: this process (`tasks.job`), the processes of `accelerate launch`
(`engines.accelerate`), or a Ray cluster (`engines.ray`, extra `somelvlm[ray]`)."""
