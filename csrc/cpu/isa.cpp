// The CPU kernels' runtime choices, exposed through flatfused._C (csrc/ops.cpp): the
// instruction set (selected in isa.h) and the array size from which write-only outputs use
// streaming stores (stream_store.h).
#include "isa.h"
#include "kernels.h"
#include "parallel.h"

namespace flatfused {
namespace cpu {

const char* current_isa_name() { return isa_name(active_isa()); }
const char* select_isa(const char* name) { return isa_name(set_active_isa(name)); }
int64_t set_stream_bytes(int64_t bytes) { return stream_bytes().exchange(bytes); }

}  // namespace cpu
}  // namespace flatfused
