// Package wsconn carries a byte stream over a gorilla/websocket connection,
// like the seed's wsconn package: the tunnel runs yamux on top of it.
//
// Every Write is sent as one binary message. Read returns bytes from the
// received binary messages in order, crossing message boundaries, so message
// boundaries mean nothing to the reader (yamux writes a frame header and its
// body with two separate Writes, i.e. two messages). A text message is an
// error.
package wsconn

import (
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/gorilla/websocket"
)

// BufferSize is the read and write buffer size of the relay's tunnel WebSockets
// (the agent's is its -ws-buffer flag: gorilla's 4 KiB by default).
const BufferSize = 64 << 10

// Conn is a net.Conn over a *websocket.Conn.
type Conn struct {
	ws *websocket.Conn

	readMu sync.Mutex
	msg    io.Reader // the message being read, nil between messages

	writeMu sync.Mutex

	doneOnce sync.Once
	readDone chan struct{} // closed when reading has failed for good
	readErr  error         // why; set before readDone is closed

	closeMu sync.Mutex
	closed  bool
}

var _ net.Conn = (*Conn)(nil)

// New wraps ws. The caller must not read from or write messages to ws after this.
func New(ws *websocket.Conn) *Conn {
	return &Conn{ws: ws, readDone: make(chan struct{})}
}

// WebSocket returns the underlying connection.
func (c *Conn) WebSocket() *websocket.Conn { return c.ws }

func (c *Conn) Read(p []byte) (int, error) {
	c.readMu.Lock()
	defer c.readMu.Unlock()
	for {
		if c.msg == nil {
			kind, r, err := c.ws.NextReader()
			if err != nil {
				c.failRead(err)
				return 0, err
			}
			if kind != websocket.BinaryMessage {
				err := fmt.Errorf("wsconn: unexpected message type %d (want binary)", kind)
				c.failRead(err)
				return 0, err
			}
			c.msg = r
		}
		n, err := c.msg.Read(p)
		if err == io.EOF {
			c.msg = nil
			if n == 0 {
				continue
			}
			err = nil
		}
		if err != nil {
			c.failRead(err)
		}
		return n, err
	}
}

func (c *Conn) failRead(err error) {
	c.doneOnce.Do(func() {
		c.readErr = err
		close(c.readDone)
	})
}

// ReadErr is the error that ended reading (a *websocket.CloseError when the
// peer sent a close frame), or nil while reading still works.
func (c *Conn) ReadErr() error {
	select {
	case <-c.readDone:
		return c.readErr
	default:
		return nil
	}
}

// Write sends p as one binary message. gorilla sends it as one frame from a
// server; from a client it is fragmented into frames of its write buffer's size
// (4 KiB with gorilla's defaults, the seed agent's).
func (c *Conn) Write(p []byte) (int, error) {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	if err := c.ws.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Close sends a normal close frame (1000) and closes the connection.
func (c *Conn) Close() error {
	return c.CloseWithCode(websocket.CloseNormalClosure, "", 0)
}

// CloseWithCode sends a close frame with code and reason, waits up to linger
// for the peer's close frame (or any end of reading), then closes the TCP
// connection. Only the first call does anything.
func (c *Conn) CloseWithCode(code int, reason string, linger time.Duration) error {
	c.closeMu.Lock()
	if c.closed {
		c.closeMu.Unlock()
		return nil
	}
	c.closed = true
	c.closeMu.Unlock()
	// WriteControl may run concurrently with Write (gorilla allows it).
	msg := websocket.FormatCloseMessage(code, reason)
	_ = c.ws.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second))
	if linger > 0 {
		t := time.NewTimer(linger)
		select {
		case <-c.readDone:
		case <-t.C:
		}
		t.Stop()
	}
	return c.ws.Close()
}

func (c *Conn) LocalAddr() net.Addr  { return c.ws.LocalAddr() }
func (c *Conn) RemoteAddr() net.Addr { return c.ws.RemoteAddr() }

func (c *Conn) SetDeadline(t time.Time) error {
	if err := c.ws.SetReadDeadline(t); err != nil {
		return err
	}
	return c.ws.SetWriteDeadline(t)
}

func (c *Conn) SetReadDeadline(t time.Time) error  { return c.ws.SetReadDeadline(t) }
func (c *Conn) SetWriteDeadline(t time.Time) error { return c.ws.SetWriteDeadline(t) }
