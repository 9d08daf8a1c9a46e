/* core/log.h: leveled logging to stderr. The level comes from QLR_LOG
 * (error|warn|info|debug, default info) or qlr_log_set_level(). Debug lines carry file:line. */
#ifndef QLR_CORE_LOG_H
#define QLR_CORE_LOG_H

typedef enum qlr_log_level {
    QLR_LOG_ERROR = 0,
    QLR_LOG_WARN = 1,
    QLR_LOG_INFO = 2,
    QLR_LOG_DEBUG = 3,
} qlr_log_level;

void qlr_log_set_level(qlr_log_level lvl);
qlr_log_level qlr_log_get_level(void);
void qlr_log_(qlr_log_level lvl, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#define QLR_LOGE(...) qlr_log_(QLR_LOG_ERROR, __FILE__, __LINE__, __VA_ARGS__)
#define QLR_LOGW(...) qlr_log_(QLR_LOG_WARN, __FILE__, __LINE__, __VA_ARGS__)
#define QLR_LOGI(...) qlr_log_(QLR_LOG_INFO, __FILE__, __LINE__, __VA_ARGS__)
#define QLR_LOGD(...) qlr_log_(QLR_LOG_DEBUG, __FILE__, __LINE__, __VA_ARGS__)

#endif
