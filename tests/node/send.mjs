// One message through relayd with nodemailer, for tests/test_interop.py.
// Reads its options as JSON on stdin (the password stays out of argv):
//   {host, port, secure, ca, name, user, pass, method, from, to, subject, text}
// secure: true = implicit TLS (465-style); false = STARTTLS, required.
// Prints nodemailer's result as one JSON line; exits 1 with the error.
import { readFileSync } from "node:fs";
import nodemailer from "nodemailer";

const o = JSON.parse(readFileSync(0, "utf8"));
const transport = nodemailer.createTransport({
  host: o.host,
  port: o.port,
  secure: o.secure,
  requireTLS: !o.secure,
  name: o.name,
  auth: { user: o.user, pass: o.pass },
  authMethod: o.method,
  tls: { ca: readFileSync(o.ca), servername: "localhost" },
  connectionTimeout: 10000,
  greetingTimeout: 10000,
  socketTimeout: 20000,
});
try {
  const info = await transport.sendMail({ from: o.from, to: o.to, subject: o.subject, text: o.text });
  console.log(JSON.stringify({ response: info.response, accepted: info.accepted,
                               rejected: info.rejected, messageId: info.messageId }));
} catch (err) {
  console.error(`nodemailer: ${err.code || ""} ${err.message}`);
  process.exitCode = 1;
}
