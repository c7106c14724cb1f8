"""Everything that turns a trained network into images, one module per job:

    edm.py           EDM's edm_sampler (Heun, Algorithm 2) and ablation_sampler, EDM's float64 arithmetic
    solvers.py       few-step solvers fn(denoiser, x, sigmas, ...) and solvers.sample by name
    schedules.py     every noise level: EDM's (float64 or diff-sampler's float32), ablation, few-step
    denoisers.py     Step (what every sampler hands callback), NFECounter, MinBatchNet, trace_sampler
    seeds.py         seed lists and per-seed latents and labels, as EDM draws them
    guidance.py      Discriminator Guidance at sampling time: GuidedDenoiser, guided_edm_sampler (EDM-G++)
    ot_start.py      the semi-discrete OT map and OT-start sampling
    generate.py      make_sampler (options -> sampler), generate_images(), write_behind, PNG writing
    image_folder.py  generate.py's resumable output folder (ImageFolder, dataset.json, sampling.json)
    images.py        uint8 conversion, grids, atomic PNG writes
"""
