# Finds the Debian-packaged dependencies and says what it found.
# zlib and a BLAS are needed by every build; jansson, libyaml, PCRE2 and libmicrohttpd by
# the full program (formats/, data/, infer/, cli/). When one of those is missing the build
# shrinks to core + quant + backend (what the GPU op tests and benchmarks need) and says so.
find_package(PkgConfig REQUIRED)
find_package(Threads REQUIRED)
find_package(ZLIB REQUIRED)

pkg_check_modules(OPENBLAS IMPORTED_TARGET openblas)
if(OPENBLAS_FOUND)
  add_library(qlr_blas INTERFACE)
  target_link_libraries(qlr_blas INTERFACE PkgConfig::OPENBLAS)
  message(STATUS "BLAS: OpenBLAS ${OPENBLAS_VERSION}")
else()
  set(BLA_VENDOR OpenBLAS)
  find_package(BLAS)
  if(NOT BLAS_FOUND)
    message(FATAL_ERROR "OpenBLAS not found: apt-get install libopenblas-dev (or run scripts/setup.sh)")
  endif()
  add_library(qlr_blas INTERFACE)
  target_link_libraries(qlr_blas INTERFACE ${BLAS_LIBRARIES})
  message(STATUS "BLAS: ${BLAS_LIBRARIES}")
endif()

set(QLR_FULL ON)
set(_qlr_missing)
foreach(pair "JANSSON;jansson;libjansson-dev" "YAML;yaml-0.1;libyaml-dev"
             "PCRE2;libpcre2-8;libpcre2-dev" "MHD;libmicrohttpd;libmicrohttpd-dev")
  list(GET pair 0 var)
  list(GET pair 1 mod)
  list(GET pair 2 deb)
  pkg_check_modules(${var} IMPORTED_TARGET ${mod})
  if(${var}_FOUND)
    message(STATUS "${mod}: ${${var}_VERSION}")
  else()
    list(APPEND _qlr_missing ${deb})
  endif()
endforeach()
if(_qlr_missing)
  set(QLR_FULL OFF)
  message(WARNING "Missing ${_qlr_missing}: building only core, quant and backend "
                  "(GPU op tests and benchmarks). Run scripts/setup.sh or apt-get install ${_qlr_missing} "
                  "for the full qlora program.")
endif()
