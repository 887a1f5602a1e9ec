/* Command line parsing: space-separated words, "key=value"; used for probe=<tests> and the
 * optional expectations probe.cpus=, probe.mem=, probe.count=. */
#include "lib/boot.h"
#include "lib/util.h"

bool cmdline_find(const char *key, const char **value, size_t *len)
{
	size_t keylen = strlen(key);
	const char *p = boot.cmdline;

	while (*p) {
		const char *word = p;

		while (*p && *p != ' ')
			p++;
		if ((size_t)(p - word) > keylen && !memcmp(word, key, keylen) && word[keylen] == '=') {
			*value = word + keylen + 1;
			*len = p - *value;
			return true;
		}
		while (*p == ' ')
			p++;
	}
	return false;
}

bool cmdline_u64(const char *key, uint64_t *value)
{
	const char *s;
	size_t len;

	return cmdline_find(key, &s, &len) && parse_u64(s, len, value);
}
