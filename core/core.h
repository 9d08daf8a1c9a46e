/* core/core.h: the core module's public headers in one include. core/ owns status codes and
 * error messages, logging, the progress bar, dtypes, arenas, threads and file helpers; it
 * depends on libc, pthreads and zlib only. */
#ifndef QLR_CORE_H
#define QLR_CORE_H

#include "core/arena.h"
#include "core/dtype.h"
#include "core/file.h"
#include "core/hash.h"
#include "core/log.h"
#include "core/progress.h"
#include "core/status.h"
#include "core/strbuf.h"
#include "core/testhook.h"
#include "core/threads.h"

#endif
