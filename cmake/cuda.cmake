# The CUDA part: fastnn._cuda, built when nvcc and cuBLASLt (header and library) are found.
# FASTNN_CUDA=ON turns their absence into an error, OFF skips this file; the build log says which
# happened and why. cuBLASLt is looked for in FASTNN_CUBLAS_ROOT, the CUDA toolkit, and the
# nvidia-cublas wheel of the Python that runs the build (nvidia/cu13, nvidia/cublas).
include(CheckLanguage)

set(_fastnn_cuda_skip "")
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
  set(_fastnn_cuda_skip "nvcc was not found (put it on PATH or set CUDACXX)")
else()
  find_package(CUDAToolkit QUIET)
  set(_hints "")
  if(FASTNN_CUBLAS_ROOT)
    list(APPEND _hints "${FASTNN_CUBLAS_ROOT}")
  endif()
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
            "import os, nvidia; print(';'.join(os.path.join(p, d) for p in nvidia.__path__ for d in ('cu13', 'cublas', 'cu12')))"
    OUTPUT_VARIABLE _wheel_hints OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  list(APPEND _hints ${_wheel_hints})
  if(CUDAToolkit_FOUND)
    list(APPEND _hints "${CUDAToolkit_LIBRARY_ROOT}" ${CUDAToolkit_INCLUDE_DIRS} "${CUDAToolkit_LIBRARY_DIR}")
  endif()
  find_path(FASTNN_CUBLASLT_INCLUDE cublasLt.h HINTS ${_hints} PATH_SUFFIXES include)
  find_library(FASTNN_CUBLASLT_LIBRARY NAMES cublasLt libcublasLt.so.13 libcublasLt.so.12
               HINTS ${_hints} PATH_SUFFIXES lib lib64)
  if(NOT CUDAToolkit_FOUND)
    set(_fastnn_cuda_skip "the CUDA toolkit (runtime library) was not found next to nvcc")
  elseif(NOT FASTNN_CUBLASLT_INCLUDE OR NOT FASTNN_CUBLASLT_LIBRARY)
    set(_fastnn_cuda_skip "cuBLASLt was not found (cublasLt.h: ${FASTNN_CUBLASLT_INCLUDE}; library: ${FASTNN_CUBLASLT_LIBRARY}); set FASTNN_CUBLAS_ROOT to a folder with include/cublasLt.h and lib/libcublasLt.so*")
  endif()
endif()

if(_fastnn_cuda_skip)
  if(FASTNN_CUDA STREQUAL "ON")
    message(FATAL_ERROR "fastnn: FASTNN_CUDA=1 but the CUDA part cannot be built: ${_fastnn_cuda_skip}")
  endif()
  message(STATUS "fastnn: CUDA part skipped: ${_fastnn_cuda_skip} (FASTNN_CUDA=1 makes this an error)")
  return()
endif()

enable_language(CUDA)
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
if(NOT FASTNN_CUDA_ARCHS)
  set(FASTNN_CUDA_ARCHS "80-real;90")  # sm_80 and sm_90 machine code, plus sm_90 PTX for newer GPUs
endif()
message(STATUS "fastnn: CUDA part built with nvcc ${CMAKE_CUDA_COMPILER_VERSION} for ${FASTNN_CUDA_ARCHS}; "
               "cuBLASLt ${FASTNN_CUBLASLT_LIBRARY}")

add_library(fastnn_cuda_kernels OBJECT csrc/cuda/epilogue_kernels.cu csrc/cuda/lt_gemm.cpp)
target_include_directories(fastnn_cuda_kernels PRIVATE csrc/include csrc "${FASTNN_CUBLASLT_INCLUDE}"
                                                       ${CUDAToolkit_INCLUDE_DIRS})
set_target_properties(fastnn_cuda_kernels PROPERTIES CUDA_ARCHITECTURES "${FASTNN_CUDA_ARCHS}"
                                                     POSITION_INDEPENDENT_CODE ON)
target_compile_options(fastnn_cuda_kernels PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr>)

pybind11_add_module(_cuda MODULE NO_EXTRAS csrc/cuda/bindings_cuda.cpp $<TARGET_OBJECTS:fastnn_cuda_kernels>)
target_include_directories(_cuda PRIVATE csrc/include csrc "${FASTNN_CUBLASLT_INCLUDE}" ${CUDAToolkit_INCLUDE_DIRS})
string(REPLACE ";" "," _archs_str "${FASTNN_CUDA_ARCHS}")
target_compile_definitions(_cuda PRIVATE FASTNN_VERSION="${FASTNN_VERSION}" FASTNN_CUDA_ARCHS_STR="${_archs_str}")
# cudart linked statically: no libcudart.so needed at run time. cuBLASLt is shared: where torch
# already loaded libcublasLt.so.N the loader reuses it; else the rpath finds the nvidia-cublas wheel.
target_link_libraries(_cuda PRIVATE "${FASTNN_CUBLASLT_LIBRARY}" CUDA::cudart_static)
set_target_properties(_cuda PROPERTIES
  LIBRARY_OUTPUT_DIRECTORY "${FASTNN_OUTPUT_DIR}"
  BUILD_WITH_INSTALL_RPATH ON
  INSTALL_RPATH "\$ORIGIN/../nvidia/cu13/lib;\$ORIGIN/../nvidia/cublas/lib")
