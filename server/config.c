/* Configuration table of `topiary serve`; see config.h. Stub bodies until the implementation lands. */
#include "config.h"

#include <stdlib.h>
#include <string.h>

top_status config_defaults(server_config *cfg, top_error *err)
{
    memset(cfg, 0, sizeof *cfg);
    return top_error_set(err, TOP_ERR_UNSUPPORTED, "the configuration table is not implemented yet");
}
top_status config_parse(server_config *cfg, int argc, char **argv, char *const *envp, config_action *action, top_error *err)
{
    (void)argc, (void)argv, (void)envp;
    *action = CONFIG_ACTION_RUN;
    return config_defaults(cfg, err);
}
top_status config_validate(const server_config *cfg, top_error *err) { (void)cfg; (void)err; return TOP_OK; }
void config_free(server_config *cfg) { memset(cfg, 0, sizeof *cfg); }
void config_print_help(FILE *out) { (void)out; }
void config_write(FILE *out, const server_config *cfg) { (void)out, (void)cfg; }
void config_write_sample(FILE *out) { (void)out; }
