// Package hop removes hop-by-hop HTTP headers (RFC 9110 section 7.6.1).
package hop

import (
	"net/http"
	"strings"
)

var headers = []string{
	"Connection",
	"Keep-Alive",
	"Proxy-Authenticate",
	"Proxy-Authorization",
	"Proxy-Connection",
	"TE",
	"Trailer",
	"Transfer-Encoding",
	"Upgrade",
}

// Strip deletes the hop-by-hop headers from h, including those named in Connection.
func Strip(h http.Header) {
	for _, v := range h.Values("Connection") {
		for _, name := range strings.Split(v, ",") {
			if name = strings.TrimSpace(name); name != "" {
				h.Del(name)
			}
		}
	}
	for _, name := range headers {
		h.Del(name)
	}
}
