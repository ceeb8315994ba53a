// Portability macros shared by the CPU (.cpp) and CUDA (.cu) kernel sources.
#pragma once

// Marks small inline math usable from host code and from CUDA device code.
#ifdef __CUDACC__
#define FASTUDA_HD __host__ __device__
#else
#define FASTUDA_HD
#endif
