// Every model struct, one include per model_<name>.cuh. The Python registry
// (stemgpu/atoms/models.py, field cuda_struct) names the structs: the runtime loader
// instantiates lm_fit_kernel<..., M, ...> for each, and the host build compiles
// host_api.cu with the registry's list (STEMGPU_MODEL_LIST), so a new model is one
// registry entry, one model_<name>.cuh and one line here.
#pragma once
#include "model_gaussian.cuh"
#include "model_elliptical.cuh"
