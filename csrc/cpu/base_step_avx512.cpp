// The avx512 instance of the base-step loops (base_step_isa.h), in a file of its own so that
// the build compiles the instruction sets in parallel (see base_step.cpp).
#define FF_ISA_ONLY 2
#define FF_ISA_BODY "base_step_isa.h"
#include "foreach_isa.h"
